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
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fedlight_flower  # noqa: F401  (quiet/offline env before flwr is imported)

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

if TYPE_CHECKING:  # heavy imports stay out of the module: a `query` process never needs torch
    from fedlight.core.state import State

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
    """fedlight client id -> Flower node id, asked of every node (its ``partition-id``)."""
    nodes = _wait_for_nodes(grid, count, timeout)
    messages = [Message(RecordDict(), dst_node_id=node, message_type="query", group_id="0") for node in nodes]
    mapping: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} failed to identify: {reply.error.reason}")
        client_id = int(reply.content.config_records["fedlight.info"]["client-id"])
        if client_id in mapping:
            raise RuntimeError(f"two SuperNodes claim fedlight client {client_id}: give each a distinct partition-id")
        mapping[client_id] = reply.metadata.src_node_id
    missing = sorted(set(range(count)) - set(mapping))
    if missing:
        raise RuntimeError(f"no SuperNode holds fedlight clients {missing[:10]} (node_config partition-id)")
    return mapping


def _write_outputs(out: Path, global_state: State, history: list[dict[str, Any]]) -> None:
    from safetensors.torch import save_file

    from fedlight.core.round import CSV_COLUMNS

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
    from fedlight.core.update import ClientUpdate

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
                        ),  # fmt: skip
                    }
                ),
                dst_node_id=node_of[c],
                message_type="train",
                group_id=str(round_idx),
            )
            for c, s in senders
        ]
        replies = {int(r.metadata.src_node_id): r for r in grid.send_and_receive(messages, timeout=round_timeout)}
        updates: list[ClientUpdate] = []
        failed: dict[int, str] = {}
        losses: list[float] = []
        for client_id, _ in senders:  # in plan order, as the in-process loop appends them
            reply = replies.get(node_of[client_id])
            if reply is None or reply.has_error():
                failed[client_id] = "no reply within round-timeout" if reply is None else reply.error.reason
                message = f"round {round_idx}: client {client_id} failed: {failed[client_id]}"
                print(f"[fedlight-flower] {message}", flush=True)
                continue
            theirs = str(reply.content.config_records["fedlight.info"]["backbone"])
            if theirs != backbone:
                raise RuntimeError(
                    f"client {client_id} trains a different frozen backbone (digest {theirs} != server {backbone}): "
                    "every machine needs the same model weights; for random-init models set seed_everything"
                )
            m = reply.content.metric_records["fedlight.metrics"]
            record = reply.content.array_records["fedlight.update"]
            if arrays:
                encoded = job.client_pipeline.uplink.encode(record_to_state(record, job.shared_names))
            else:
                encoded = record_to_bytes(record)
            losses.append(float(m["train_loss"]))
            metrics = {"train_loss": float(m["train_loss"])}
            updates.append(ClientUpdate(client_id, int(m["num-examples"]), encoded, metrics))
        generator = round_generator(job.seed, round_idx, 0)
        new_global, report = job.server_pipeline.aggregate(global_state, updates, generator)
        fed.privacy.on_round_end()
        if len(report.accepted) < fed.faults.min_clients:
            message = f"round {round_idx}: {len(report.accepted)} accepted updates < federation.faults.min_clients"
            if fed.faults.on_too_few_clients == "stop":
                raise TooFewClientsError(message)
            print(f"[fedlight-flower] {message}; round skipped, global model unchanged", flush=True)
            new_global = global_state
        for client_id, reason in report.rejected.items():
            print(f"[fedlight-flower] round {round_idx}: rejected update of client {client_id}: {reason}", flush=True)
        global_state = new_global
        row = {
            "round": round_idx,
            "num_clients": len(report.accepted),
            "rejected": len(report.rejected),
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
