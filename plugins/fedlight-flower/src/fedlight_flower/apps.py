"""Flower ServerApp and ClientApp (Message API) running fedlight's client and server pipelines.

Message protocol (one ``RecordDict`` per message):

* ``query``  server -> every node: "which fedlight client are you?"; reply ``fedlight.info``
  (ConfigRecord ``client-id`` = the node's ``partition-id``). Cheap: it imports neither torch nor the job.
* ``train``  server -> each sampled client: ``fedlight.global`` (the broadcast: one fp32 Array per shipped
  tensor, or the downlink codec payload as uint8 under one Array for non-identity codecs) and
  ``fedlight.config`` (``round``, ``client-id``, ``steps``, ``seed``, ``data-seed``, ``privacy-state``).
  Reply: ``fedlight.update`` (the encoded update: fp32 arrays of the shipped tensors, or the uplink payload
  bytes), ``fedlight.metrics`` (MetricRecord: ``num-examples``, ``train_loss``, ``steps``, ``uplink-bytes``)
  and ``fedlight.info`` (``backbone``: a digest of the client's frozen tensors, checked by the server).

Client state that fedlight keeps per client between rounds (``local`` tensors for personalisation,
codec error-feedback ``residual``) lives in the node's ``Context.state`` as ``fedlight.state.<purpose>``
ArrayRecords: where Flower keeps node state (a deployed SuperNode runs every message in a fresh
``flwr-clientapp`` process, so nothing else survives between rounds).

Sampling is fedlight's ``FederatedRound.plan_for`` (same seed -> same clients as ``fedlight fit``);
aggregation, validation, secure sum and central DP are fedlight's ``ServerPipeline``, never a Flower Strategy.

The server decides, not the client: every ``train`` reply passes :func:`screen_replies` before anything
of it is used. The example count is the partition size the server planned (a reply claiming another is
rejected), and a reply that is malformed, stale, duplicated, from a node that was not asked or for another
client becomes a rejection in the round's ``rejected`` column (reason logged), never an exception out of
the round loop. Decoding and validating the update itself is ``ServerPipeline.aggregate``'s job.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

import fedlight_flower  # noqa: F401  (its __init__ sets the quiet/offline env; it runs before this module anyway)

if TYPE_CHECKING:  # heavy imports stay out of the module: a `query` process never needs torch
    from fedlight.core.state import State
    from fedlight.core.update import ClientUpdate
    from fedlight_flower.job import FedlightJob

CONFIG_KEY = "config"  # run_config: path of the fedlight YAML
OUT_KEY = "out"  # run_config: where the ServerApp writes global_state.safetensors, rounds.csv/json
TIMEOUT_KEY = "round-timeout"  # run_config: seconds to wait for a round's replies
NODES_TIMEOUT_KEY = "nodes-timeout"  # run_config: seconds to wait for all SuperNodes to connect
PARTITION_KEY = "partition-id"  # node_config: which fedlight client this SuperNode is
CONFIG_ENV = "FEDLIGHT_FLOWER_CONFIG"  # fallback for the config path
STATE_PREFIX = "fedlight.state."

_JOBS: dict[str, FedlightJob] = {}


def get_job(config: str) -> FedlightJob:
    """One job per process and config (a Ray actor reuses it; a SuperNode's ClientApp process is fresh)."""
    from fedlight_flower.job import FedlightJob

    key = str(Path(config).resolve())
    if key not in _JOBS:
        _JOBS[key] = FedlightJob(key)
    return _JOBS[key]


def _config_path(context: Context, default: str | None) -> str:
    path = default or context.run_config.get(CONFIG_KEY) or os.environ.get(CONFIG_ENV)
    if not path:
        raise ValueError(f"no fedlight config: set run config `{CONFIG_KEY}` or ${CONFIG_ENV}")
    return str(path)


def _partition(context: Context) -> int:
    if PARTITION_KEY not in context.node_config:
        raise ValueError(f"this SuperNode has no `{PARTITION_KEY}`: start it with --node-config \"{PARTITION_KEY}=K\"")
    return int(context.node_config[PARTITION_KEY])


# --- state <-> records ----------------------------------------------------------------------------


def uses_arrays(job: FedlightJob) -> bool:
    """fp32 arrays on the wire when both codecs are lossless identity; otherwise the codecs' payload bytes."""
    from fedlight.codecs.identity import IdentityCodec

    pipeline = job.client_pipeline
    return isinstance(pipeline.uplink, IdentityCodec) and isinstance(pipeline.downlink, IdentityCodec)


def state_to_record(state: State) -> ArrayRecord:
    """fp32 numpy arrays (numpy has no bf16), in the state's order."""
    return ArrayRecord({k: v.detach().float().cpu().contiguous() for k, v in state.items()})


def record_to_state(record: ArrayRecord, names: list[str] | None = None) -> State:
    tensors = record.to_torch_state_dict()
    return {k: tensors[k].clone() for k in (names if names is not None else tensors)}


def bytes_to_record(payload: bytes) -> ArrayRecord:
    return ArrayRecord([np.frombuffer(payload, dtype=np.uint8).copy()])


def record_to_bytes(record: ArrayRecord) -> bytes:
    (array,) = record.to_numpy_ndarrays()
    return array.astype(np.uint8).tobytes()


# --- ClientApp -------------------------------------------------------------------------------------


def _load_client_state(context: Context) -> dict[str, State]:
    return {
        key[len(STATE_PREFIX) :]: record_to_state(rec)
        for key, rec in context.state.array_records.items()
        if key.startswith(STATE_PREFIX)
    }


def _save_client_state(context: Context, client_state: dict[str, State]) -> None:
    for purpose, state in client_state.items():
        context.state[STATE_PREFIX + purpose] = state_to_record(state)


def client_train(job: FedlightJob, content: RecordDict, context: Context) -> RecordDict:
    """One sampled client's round: decode the broadcast, train locally, run the client pipeline."""
    cfg = content.config_records["fedlight.config"]
    round_idx, client_id, steps = int(cfg["round"]), int(cfg["client-id"]), int(cfg["steps"])
    partition = _partition(context)
    if partition != client_id:
        raise RuntimeError(f"message for fedlight client {client_id} reached the node holding partition {partition}")
    # the server's seeds win: a process whose own seed_everything differs must still batch and noise alike
    job.seed, job.data_seed = int(cfg["seed"]), int(cfg["data-seed"])
    if cfg.get("privacy-state"):
        job.federation.privacy.load_state_dict(json.loads(str(cfg["privacy-state"])))
    broadcast = content.array_records["fedlight.global"]
    arrays = uses_arrays(job)
    if arrays:
        start = record_to_state(broadcast, job.shared_names)
    else:
        start = job.client_pipeline.receive(record_to_bytes(broadcast))
    client_state = _load_client_state(context)
    result = job.local_fit(round_idx, client_id, steps, start, client_state.get("local"))
    update = job.client_update(round_idx, client_id, start, result, client_state)
    if job.module.local_names:
        client_state["local"] = result.local
    _save_client_state(context, client_state)
    if arrays:  # identity codec: the payload is the fp32 delta; ship it as arrays
        shipped = state_to_record(job.client_pipeline.uplink.decode(update.payload))
    else:
        shipped = bytes_to_record(update.payload)
    metrics = MetricRecord(
        {"num-examples": update.num_examples, "steps": result.steps, "uplink-bytes": update.num_bytes, **update.metrics}
    )
    info = ConfigRecord({"client-id": client_id, "backbone": job.backbone_fingerprint()})
    return RecordDict({"fedlight.update": shipped, "fedlight.metrics": metrics, "fedlight.info": info})


def build_client_app(config: str | None = None) -> ClientApp:
    """A ClientApp for ``config`` (or, when None, the run config's ``config`` path)."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"fedlight.info": ConfigRecord({"client-id": _partition(context)})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        job = get_job(_config_path(context, config))
        return Message(client_train(job, msg.content, context), reply_to=msg)

    return app


# --- ServerApp -------------------------------------------------------------------------------------


def _wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {count} SuperNodes connected within {timeout:.0f}s")
        time.sleep(0.5)


def map_clients(grid: Grid, count: int, timeout: float) -> dict[int, int]:
    """fedlight client id -> Flower node id, asked of every node (its ``partition-id``).

    A node whose answer is an error or malformed is left out (and named); the run then stops before
    round 1 if a client has no node, or if two nodes claim the same client.
    """
    nodes = _wait_for_nodes(grid, count, timeout)
    messages = [Message(RecordDict(), dst_node_id=node, message_type="query", group_id="0") for node in nodes]
    mapping: dict[int, int] = {}
    ignored: list[str] = []
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = getattr(getattr(reply, "metadata", None), "src_node_id", None)
        try:
            if node not in nodes:
                raise ValueError("this node was not asked")
            if reply.has_error():
                raise ValueError(f"error reply: {reply.error.reason}")
            client_id = reply.content.config_records["fedlight.info"]["client-id"]
            if type(client_id) is not int or not 0 <= client_id < count:
                raise ValueError(f"client-id {client_id!r} is not an int in [0, {count})")
        except Exception as err:  # noqa: BLE001 (a node's bad answer must not crash the ServerApp)
            ignored.append(f"node {node}: {err}")
            print(f"[fedlight-flower] ignored the identification of {ignored[-1]}", flush=True)
            continue
        if client_id in mapping and mapping[client_id] != node:
            raise RuntimeError(f"two SuperNodes claim fedlight client {client_id}: give each a distinct partition-id")
        mapping[client_id] = node
    missing = sorted(set(range(count)) - set(mapping))
    if missing:
        detail = f"; ignored answers: {'; '.join(ignored[:5])}" if ignored else ""
        raise RuntimeError(f"no SuperNode holds fedlight clients {missing[:10]} (node_config partition-id){detail}")
    return mapping


# --- reply screening: the only place a client's reply is trusted ----------------------------------

#: metric keys every ``train`` reply must carry (``steps``, ``uplink-bytes`` and others are informational)
REQUIRED_METRICS = ("num-examples", "train_loss")
UPDATE_RECORD, METRICS_RECORD, INFO_RECORD = "fedlight.update", "fedlight.metrics", "fedlight.info"
NPY_STYPE = "numpy.ndarray"


class ReplyRejected(ValueError):
    """A ``train`` reply the server does not use; the message says what was wrong with it."""


@dataclass(frozen=True)
class PlannedReply:
    """What the server asked of one client this round: the facts a reply is checked against."""

    client_id: int
    node_id: int
    round_idx: int
    num_examples: int  # the partition size the server knows, never the client's claim
    message_id: str = ""  # set by the Grid when it pushes the message ('' on a grid that assigns none)


@dataclass
class ScreenedReplies:
    """One round's replies after :func:`screen_replies`: updates for ``ServerPipeline.aggregate`` and the rest."""

    updates: list[ClientUpdate] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # "client K" / "node N" -> reason
    failed: dict[int, str] = field(default_factory=dict)  # client id -> reason (no reply, error reply)


def _npy_array(array: Any, shape: tuple[int, ...] | None, dtype: np.dtype, what: str) -> np.ndarray:
    """``array`` as numpy once its .npy header matches ``shape`` (None: any 1-D) and ``dtype``, before allocating."""
    from flwr.app import Array

    if not isinstance(array, Array):
        raise ReplyRejected(f"{what}: not a Flower Array ({type(array).__name__})")
    if array.stype != NPY_STYPE or not isinstance(array.data, bytes):
        raise ReplyRejected(f"{what}: serialisation {array.stype!r}, expected {NPY_STYPE!r} bytes")
    stream = io.BytesIO(array.data)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        got_shape, _, got_dtype = read_header(stream)  # bounded: numpy refuses headers over 10 kB
    except Exception as err:  # noqa: BLE001
        raise ReplyRejected(f"{what}: not a .npy array ({err})") from None
    got_shape = tuple(got_shape)
    if shape is None:
        shape = got_shape if len(got_shape) == 1 else (-1,)
    if got_dtype != dtype or got_shape != tuple(shape):
        raise ReplyRejected(f"{what}: {got_dtype} {got_shape}, expected {dtype} {tuple(shape)}")
    if str(array.dtype) != dtype.name or tuple(array.shape) != got_shape:
        raise ReplyRejected(f"{what}: Array says {array.dtype} {tuple(array.shape)}, its data {got_dtype} {got_shape}")
    expected_bytes = math.prod(shape) * dtype.itemsize
    if len(array.data) - stream.tell() != expected_bytes:
        raise ReplyRejected(f"{what}: {len(array.data) - stream.tell()} data bytes, expected {expected_bytes}")
    return np.load(io.BytesIO(array.data), allow_pickle=False)


def _update_payload(record: Any, job: FedlightJob, global_state: State, arrays: bool) -> bytes:
    """The reply's update as uplink payload bytes; names, shapes and dtypes checked against the global state."""
    import torch

    if not isinstance(record, ArrayRecord):
        raise ReplyRejected(f"{UPDATE_RECORD} is {type(record).__name__}, not an ArrayRecord")
    if not arrays:  # one uint8 Array: the uplink codec's payload, decoded and validated by ServerPipeline
        if len(record) != 1:
            raise ReplyRejected(f"{UPDATE_RECORD}: {len(record)} arrays, expected 1 (the codec payload)")
        (array,) = record.values()
        return _npy_array(array, None, np.dtype(np.uint8), UPDATE_RECORD).tobytes()
    names = job.shared_names
    extra, missing = sorted(set(record) - set(names)), [n for n in names if n not in record]
    if missing or extra:
        raise ReplyRejected(f"{UPDATE_RECORD}: missing tensors {missing[:5]}, unexpected tensors {extra[:5]}")
    fp32 = np.dtype(np.float32)
    state = {
        name: torch.from_numpy(
            _npy_array(record[name], tuple(global_state[name].shape), fp32, f"{UPDATE_RECORD}[{name}]")
        ).to(global_state[name].dtype)  # fp32 on the wire (numpy has no bf16); the delta's own dtype again
        for name in names
    }
    return job.client_pipeline.uplink.encode(state)


def _check_metadata(reply: Message, planned: PlannedReply) -> None:
    meta = reply.metadata
    if meta.message_type != "train":
        raise ReplyRejected(f"reply of type {meta.message_type!r} to a train message")
    if meta.group_id != str(planned.round_idx):
        raise ReplyRejected(f"reply for round {meta.group_id!r} in round {planned.round_idx} (stale or forged)")
    if planned.message_id and meta.reply_to_message_id != planned.message_id:
        raise ReplyRejected(f"reply to message {meta.reply_to_message_id!r}, not to this round's {planned.message_id!r}")


def _check_content(
    reply: Message, planned: PlannedReply, job: FedlightJob, global_state: State, backbone: str, arrays: bool
) -> tuple[ClientUpdate, float]:
    from fedlight.core.update import ClientUpdate

    content = reply.content
    for key, records, kind in (
        (UPDATE_RECORD, content.array_records, "ArrayRecord"),
        (METRICS_RECORD, content.metric_records, "MetricRecord"),
        (INFO_RECORD, content.config_records, "ConfigRecord"),
    ):
        if key not in records:
            raise ReplyRejected(f"no {kind} {key!r} in the reply")
    info = content.config_records[INFO_RECORD]
    claimed = info.get("client-id")
    if type(claimed) is not int or claimed != planned.client_id:
        raise ReplyRejected(f"reply claims client-id {claimed!r}; the server asked client {planned.client_id}")
    theirs = info.get("backbone")
    if theirs != backbone:
        raise ReplyRejected(
            f"frozen backbone digest {theirs!r} != server's {backbone!r}: every machine needs the same model "
            "weights (for random-init models set seed_everything)"
        )
    metrics = content.metric_records[METRICS_RECORD]
    missing = [k for k in REQUIRED_METRICS if k not in metrics]
    if missing:
        raise ReplyRejected(f"metrics {missing} missing from {METRICS_RECORD}")
    count, loss = metrics["num-examples"], metrics["train_loss"]
    if type(count) is not int:
        raise ReplyRejected(f"num-examples is {type(count).__name__} {count!r}, not an int")
    if count <= 0:
        raise ReplyRejected(f"num-examples {count} is not positive")
    if count != planned.num_examples:
        raise ReplyRejected(f"claims {count} examples; the server planned {planned.num_examples} (its partition size)")
    if type(loss) not in (int, float) or not math.isfinite(loss):
        raise ReplyRejected(f"train_loss {loss!r} is not a finite number")
    payload = _update_payload(content.array_records[UPDATE_RECORD], job, global_state, arrays)
    # the planned count, never the claim (they are equal here, but only the server's figure is used)
    update = ClientUpdate(planned.client_id, planned.num_examples, payload, {"train_loss": float(loss)})
    return update, float(loss)


def screen_replies(
    replies: list[Message], planned: list[PlannedReply], job: FedlightJob, global_state: State, backbone: str
) -> ScreenedReplies:
    """Sort one round's ``train`` replies into trusted updates, rejections and failures; never raises for a reply.

    Per planned client (in plan order, as the in-process loop appends updates): no reply or an error reply
    is a *failure* (as a client whose training raised is in-process); a reply that is duplicated, stale,
    for another message or client, or malformed (missing records, tensors or metric keys, wrong types,
    shapes or dtypes, a count other than the planned one, another backbone) is a *rejection*, and so is
    every reply from a node that was not asked this round.
    """
    out = ScreenedReplies()
    arrays = uses_arrays(job)
    by_node: dict[Any, list[Message]] = {}
    for reply in replies:
        by_node.setdefault(getattr(getattr(reply, "metadata", None), "src_node_id", None), []).append(reply)
    expected = {p.node_id for p in planned}
    for node, extra in by_node.items():
        if node not in expected:
            out.rejected[f"node {node}"] = f"{len(extra)} reply(ies) from a node that was not asked this round"
    for p in planned:
        got = by_node.get(p.node_id, [])
        label = f"client {p.client_id}"
        if not got:
            out.failed[p.client_id] = "no reply within round-timeout"
            continue
        if len(got) > 1:
            out.rejected[label] = f"{len(got)} replies to one message: none is used"
            continue
        reply = got[0]
        try:
            _check_metadata(reply, p)
            if reply.has_error():
                out.failed[p.client_id] = f"error reply: {reply.error.reason}"
                continue
            update, loss = _check_content(reply, p, job, global_state, backbone, arrays)
        except ReplyRejected as err:
            out.rejected[label] = str(err)
            continue
        except Exception as err:  # noqa: BLE001 (whatever a hostile reply triggers is a rejection, not a crash)
            out.rejected[label] = f"malformed reply ({type(err).__name__}: {err})"
            continue
        out.updates.append(update)
        out.losses.append(loss)
    return out


def _write_outputs(out: Path, global_state: State, history: list[dict[str, Any]]) -> None:
    from safetensors.torch import save_file

    from fedlight.core.runlog import CSV_COLUMNS

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in global_state.items()}, str(out / "global_state.safetensors"))
    (out / "rounds.json").write_text(json.dumps(history, indent=1))
    cumulative = 0
    for row in history:
        cumulative += row.get("uplink_bytes", 0) + row.get("downlink_bytes", 0)
        row["cumulative_mb"] = round(cumulative / 1e6, 6)
    columns = list(CSV_COLUMNS)
    for row in history:
        columns.extend(k for k in row if k not in columns)
    with (out / "rounds.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)


def _privacy_state(job: FedlightJob) -> str:
    """The privacy plugin's state (e.g. an adaptive clip bound) for the clients' copies; '' when stateless."""
    state = job.federation.privacy.state_dict()
    return json.dumps(state) if state else ""


def run_server(grid: Grid, job: FedlightJob, out: Path | None, round_timeout: float, nodes_timeout: float) -> State:
    """The federated loop: plan -> broadcast -> local fits on the nodes -> fedlight server pipeline."""
    from fedlight.core.faults import TooFewClientsError
    from fedlight_flower.job import round_generator

    fed = job.federation
    node_of = map_clients(grid, job.num_clients, nodes_timeout)
    global_state = job.initial_global()
    arrays = uses_arrays(job)
    backbone = job.backbone_fingerprint()
    history: list[dict[str, Any]] = []
    if fed.eval_before_training:
        row0 = {"round": 0, "num_clients": 0, "uplink_bytes": 0, "downlink_bytes": 0}
        history.append({**row0, **job.evaluate(global_state)})
    for round_idx in range(1, job.rounds + 1):
        t0 = time.perf_counter()
        plan = job.plan(round_idx)
        payload = job.server_pipeline.broadcast(global_state)
        broadcast = state_to_record(job.client_pipeline.receive(payload)) if arrays else bytes_to_record(payload)
        # a client that drops after training (plan.lost) is not asked: its update would be discarded anyway
        senders = [(c, s) for c, s in zip(plan.training, plan.steps) if c not in plan.lost]
        privacy_state = _privacy_state(job)
        messages = [
            Message(
                RecordDict(
                    {
                        "fedlight.global": broadcast,
                        "fedlight.config": ConfigRecord(
                            {
                                "round": round_idx, "client-id": c, "steps": s, "seed": job.seed,
                                "data-seed": job.data_seed, "privacy-state": privacy_state,
                            }
                        ),
                    }
                ),
                dst_node_id=node_of[c],
                message_type="train",
                group_id=str(round_idx),
            )
            for c, s in senders
        ]
        replies = list(grid.send_and_receive(messages, timeout=round_timeout))
        planned = [
            PlannedReply(c, node_of[c], round_idx, job.dm.client_sizes[c], str(msg.metadata.message_id or ""))
            for (c, _), msg in zip(senders, messages)
        ]  # the Grid set each message's id when it pushed it
        screened = screen_replies(replies, planned, job, global_state, backbone)
        for client_id, reason in screened.failed.items():
            print(f"[fedlight-flower] round {round_idx}: client {client_id} failed: {reason}", flush=True)
        updates, losses, failed = screened.updates, screened.losses, screened.failed
        generator = round_generator(job.seed, round_idx, 0)
        new_global, report = job.server_pipeline.aggregate(global_state, updates, generator)
        fed.privacy.on_round_end()
        if len(report.accepted) < fed.faults.min_clients:
            message = f"round {round_idx}: {len(report.accepted)} accepted updates < federation.faults.min_clients"
            if fed.faults.on_too_few_clients == "stop":
                raise TooFewClientsError(message)
            print(f"[fedlight-flower] {message}; round skipped, global model unchanged", flush=True)
            new_global = global_state
        rejected = {**screened.rejected, **{f"client {k}": v for k, v in report.rejected.items()}}
        for who, reason in rejected.items():
            print(f"[fedlight-flower] round {round_idx}: rejected reply of {who}: {reason}", flush=True)
        global_state = new_global
        row = {
            "round": round_idx,
            "num_clients": len(report.accepted),
            "rejected": len(rejected),
            "dropped": len(plan.dropped_before) + len(plan.lost),
            "failed": len(failed),
            "uplink_bytes": report.uplink_bytes,
            "downlink_bytes": len(payload) * len(senders),
            "train_loss": sum(losses) / max(len(losses), 1),
            **job.evaluate(global_state),
            "epsilon": fed.privacy.epsilon(),
            "round_time_s": round(time.perf_counter() - t0, 3),
        }
        history.append(row)
        print(f"[fedlight-flower] {json.dumps(row)}", flush=True)
        if out is not None:  # after every round: a killed run still leaves its last global state
            _write_outputs(out, global_state, history)
        if round_idx < job.rounds and fed.privacy.would_exceed(1):
            print(f"[fedlight-flower] stopping after round {round_idx}: the privacy budget is spent", flush=True)
            break
    return global_state


def build_server_app(config: str | None = None, out: str | None = None) -> ServerApp:
    """A ServerApp for ``config`` (or, when None, the run config's ``config``/``out``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        job = get_job(_config_path(context, config))
        out_dir = out or context.run_config.get(OUT_KEY)
        run_server(
            grid,
            job,
            Path(str(out_dir)) if out_dir else None,
            float(context.run_config.get(TIMEOUT_KEY, 600)),
            float(context.run_config.get(NODES_TIMEOUT_KEY, 120)),
        )

    return app


#: module-level apps for deployments (``[tool.flwr.app.components]``); they read the run config
server_app = build_server_app()
client_app = build_client_app()
