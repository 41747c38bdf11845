"""Flower ServerApp and ClientApp (Message API) driving fedlight's RoundEngine.

The ServerApp runs the engine's server half: ``begin_round`` (plan, broadcast payload, the features'
``round.broadcasts``), one ``train`` message per planned client, the replies screened into
``round.updates`` / ``round.rejected`` / ``round.failed``, ``end_round`` (server pipeline, features),
validation and ``round_row``. Each ClientApp runs a client-only engine from the same config
(``receive_round`` + :func:`fedlight.core.local.train_client`), so local training, attacks, client
methods and base merging are the code ``fedlight fit`` runs.

Message protocol (one ``RecordDict`` per message):

* ``query``  server -> every node: "which fedlight client are you?"; reply ``fedlight.info``
  (ConfigRecord ``client-id`` = the node's ``partition-id``). Cheap: it imports neither torch nor the job.
* ``train``  server -> each client that trains this round (a client the plan loses after training is
  asked too and told so, as in-process it trains and its update never arrives): ``fedlight.global``
  (one fp32 Array per shipped tensor when both codecs are ``passthrough``, else the downlink payload as
  one uint8 Array), ``fedlight.broadcasts`` (the features' extra payloads, one uint8 Array per feature
  key) and ``fedlight.config`` (``round``, ``client-id``, ``steps``, ``lost``, ``batches``, ``seed``,
  ``data-seed``, ``privacy-state``). Reply: ``fedlight.update`` (the encoded update: fp32 arrays or the
  uplink payload bytes; absent when the client sends none), ``fedlight.extras`` (features' uplink
  extras, one uint8 Array per key), ``fedlight.metrics`` (MetricRecord: ``num-examples``,
  ``train_loss``, ``losses`` (every local step's loss), ``steps``, ``uplink-bytes`` and the update's own
  metrics as ``update.<name>``) and ``fedlight.info`` (``client-id``, ``backbone``: a digest of the
  client's frozen tensors, ``held``: a feature held the update back, ``failed``: why the client sent
  nothing). A held update (a malicious client's, crafted jointly by the colluding attackers) comes as
  ``fedlight.held``, the client's trained shared tensors (fp32); the ServerApp's own copy of that feature
  holds it (``hold_update``) and crafts and sends it at ``before_aggregate``, as ``fedlight fit`` does.

* ``evaluate`` server -> each client with state, after ``end_round``, for a round feature that declares
  ``client_evaluation`` (personalised evaluation): ``fedlight.global`` (the new global state, fp32),
  ``fedlight.broadcasts`` (what features send before an evaluation, ``evaluation_broadcast``: the merged
  base as of this round with a base-merging aggregator; the client applies it with ``apply_broadcast``)
  and ``fedlight.config`` (``round``, ``client-id``, ``feature``); reply ``fedlight.evaluation`` (MetricRecord,
  the feature's ``client_metrics``) and ``fedlight.info`` (``client-id``).
* ``query.secagg_keys`` / ``query.secagg_shares`` / ``query.secagg_unmask`` (secure aggregation only) and
  ``query.secagg_mask`` (secure aggregation with an attack: a crafted update to its attacker): the SecAgg steps, each client's party kept in its ``Context.state``; see :mod:`fedlight_flower.secure`.

Client state that fedlight keeps per client between rounds (``local`` tensors for personalisation,
codec error-feedback ``residual``, SCAFFOLD's ``control``) lives in the node's ``Context.state`` as
``fedlight.state.<purpose>`` ArrayRecords: where Flower keeps node state (a deployed SuperNode runs
every message in a fresh ``flwr-clientapp`` process, so nothing else survives between rounds).

The server decides, not the client: every ``train`` reply passes :func:`screen_replies` before anything
of it is used. The example count is the partition size the server planned (a reply claiming another is
rejected), and a reply that is malformed, stale, duplicated, from a node that was not asked or for another
client becomes a rejection in the round's ``rejected`` column (reason logged), never an exception out of
the round loop. Decoding and validating the update and its extras is the engine's job (its server
pipeline and the features' ``screen``).
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
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
RESUME_KEY = "resume"  # run_config: a round checkpoint to resume from (optional)
NODES_TIMEOUT_KEY = "nodes-timeout"  # run_config: seconds to wait for all SuperNodes to connect
PARTITION_KEY = "partition-id"  # node_config: which fedlight client this SuperNode is
CONFIG_ENV = "FEDLIGHT_FLOWER_CONFIG"  # fallback for the config path
STATE_PREFIX = "fedlight.state."
BROADCASTS_RECORD = "fedlight.broadcasts"  # train and evaluate: features' payloads, one uint8 Array per key

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
        raise ValueError(f'this SuperNode has no `{PARTITION_KEY}`: start it with --node-config "{PARTITION_KEY}=K"')
    return int(context.node_config[PARTITION_KEY])


# --- state <-> records ----------------------------------------------------------------------------


def uses_arrays(job: FedlightJob) -> bool:
    """fp32 arrays on the wire when both codecs are ``passthrough`` (lossless, tensors as they are);
    otherwise the codecs' payload bytes."""
    pipeline = job.engine.client
    secure = job.federation.options.secure_aggregation is not None  # the update is a masked ring vector
    return bool(pipeline.uplink.passthrough and pipeline.downlink.passthrough and not secure)


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


def payloads_to_record(payloads: dict[str, bytes]) -> ArrayRecord:
    """Named byte payloads (features' broadcasts or extras) as one uint8 Array per name."""
    return ArrayRecord({k: Array(np.frombuffer(v, dtype=np.uint8).copy()) for k, v in payloads.items()})


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
    """One client's round: the server's message -> the client-only engine -> the reply records."""
    from fedlight.core.plan import RoundPlan
    from fedlight_flower.job import dtype_like

    cfg = content.config_records["fedlight.config"]
    round_idx, client_id, steps = int(cfg["round"]), int(cfg["client-id"]), int(cfg["steps"])
    partition = _partition(context)
    if partition != client_id:
        raise RuntimeError(f"message for fedlight client {client_id} reached the node holding partition {partition}")
    engine = job.engine
    if cfg.get("privacy-state"):  # e.g. the adaptive clip bound the server's privacy plugin holds now
        engine.privacy.load_state_dict(json.loads(str(cfg["privacy-state"])))
    if uses_arrays(job):
        start = record_to_state(content.array_records["fedlight.global"], job.shared_names)
        payload = engine.client.downlink.encode(dtype_like(start, job.module))
    else:
        payload = record_to_bytes(content.array_records["fedlight.global"])
    broadcasts = {}
    if BROADCASTS_RECORD in content.array_records:
        broadcasts = {k: a.numpy().tobytes() for k, a in content.array_records[BROADCASTS_RECORD].items()}
    lost = (client_id,) if bool(cfg.get("lost", False)) else ()
    plan = RoundPlan(
        round_idx, (client_id,), (client_id,), (steps,), lost=lost, batches=str(cfg.get("batches", "shuffle"))
    )
    from fedlight_flower import secure

    if secure.RECORD in content.config_records:  # this client's SecAgg party joins the round
        refusal = secure.client_round(job, content, context, client_id, round_idx)
        if refusal:  # it cannot mask this round: it says so instead of training
            metrics = {"num-examples": job.population.client_sizes[client_id], "train_loss": 0.0, "losses": []}
            info = {"client-id": client_id, "backbone": job.backbone_fingerprint(), "failed": refusal}
            return RecordDict({METRICS_RECORD: MetricRecord(metrics), INFO_RECORD: ConfigRecord(info)})
    update, held, client_state = job.train(
        plan, payload, broadcasts, _load_client_state(context), int(cfg["seed"]), int(cfg["data-seed"])
    )
    secure.after_training(job, held is not None)
    _save_client_state(context, client_state)
    round = engine.round
    losses = [float(x) for x in round.losses]
    records: dict[str, Any] = {}
    metrics: dict[str, Any] = {
        "num-examples": job.population.client_sizes[client_id],
        "train_loss": sum(losses) / max(len(losses), 1),
        "losses": losses,
        "steps": len(losses),
    }
    if update is not None:
        if uses_arrays(job):  # passthrough codec: the payload is the fp32 delta; ship it as arrays
            records[UPDATE_RECORD] = state_to_record(engine.client.uplink.decode(update.payload))
        else:
            records[UPDATE_RECORD] = bytes_to_record(update.payload)
        if update.extras:
            records[EXTRAS_RECORD] = payloads_to_record(update.extras)
        metrics["uplink-bytes"] = update.num_bytes
        metrics.update({f"{UPDATE_METRIC}{k}": float(v) for k, v in update.metrics.items()})
    if held is not None:  # the server's feature sends it at round end (colluding attackers), as in-process
        records[HELD_RECORD] = state_to_record(held)
    failed = round.failed.get(client_id, "")
    info = {
        "client-id": client_id, "backbone": job.backbone_fingerprint(), "held": held is not None,
        "stored": client_id in engine.client_store, "failed": failed[-2000:],
    }  # fmt: skip
    records[METRICS_RECORD] = MetricRecord(metrics)
    records[INFO_RECORD] = ConfigRecord(info)
    return RecordDict(records)


EVALUATION_RECORD = "fedlight.evaluation"  # evaluate reply: a feature's client_metrics (MetricRecord)


def client_evaluate(job: FedlightJob, content: RecordDict, context: Context) -> RecordDict:
    """A feature's per-client evaluation (``client_evaluation``, e.g. personalised accuracy): the new global
    state from the message, this node's own local tensors from its ``Context.state``."""
    from fedlight_flower.job import dtype_like

    cfg = content.config_records["fedlight.config"]
    client_id = int(cfg["client-id"])
    if _partition(context) != client_id:
        raise RuntimeError(f"message for fedlight client {client_id} reached the node holding another partition")
    engine, module = job.engine, job.module
    feature = engine.feature(str(cfg["feature"]))
    if feature is None or not getattr(feature, "client_evaluation", False):
        raise RuntimeError(f"no round feature {cfg['feature']!r} evaluates on the clients in this config")
    if BROADCASTS_RECORD in content.array_records:  # e.g. the merged base as of this round (base merging)
        for key, array in content.array_records[BROADCASTS_RECORD].items():
            owner = engine.feature(key)
            if owner is None or not callable(getattr(owner, "apply_broadcast", None)):
                raise RuntimeError(f"evaluate message: no round feature {key!r} takes a broadcast in this config")
            owner.apply_broadcast(engine, array.numpy().tobytes())
    module.peft.set_state(module.model, dtype_like(record_to_state(content.array_records["fedlight.global"]), module))
    local = _load_client_state(context).get("local")
    values = feature.client_metrics(engine, client_id, dtype_like(local, module) if local else None)
    return RecordDict({
        EVALUATION_RECORD: MetricRecord({k: float(v) for k, v in values.items()}),
        INFO_RECORD: ConfigRecord({"client-id": client_id}),
    })  # fmt: skip


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

    def secagg(action: str) -> Any:
        def step(msg: Message, context: Context) -> Message:
            from fedlight_flower.secure import RECORD, client_step

            client_id = int(msg.content.config_records[RECORD]["client-id"])
            if _partition(context) != client_id:
                raise RuntimeError(f"message for fedlight client {client_id} reached another partition's node")
            return Message(client_step(action, msg.content, context, client_id), reply_to=msg)

        app.query(action)(step)

    for action in ("secagg_keys", "secagg_shares", "secagg_unmask"):
        secagg(action)

    @app.query("secagg_mask")
    def secagg_mask(msg: Message, context: Context) -> Message:
        from fedlight_flower.secure import RECORD, client_mask

        client_id = int(msg.content.config_records[RECORD]["client-id"])
        if _partition(context) != client_id:
            raise RuntimeError(f"message for fedlight client {client_id} reached another partition's node")
        job = get_job(_config_path(context, config))
        return Message(client_mask(job, msg.content, context, client_id), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        job = get_job(_config_path(context, config))
        return Message(client_evaluate(job, msg.content, context), reply_to=msg)

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
HELD_RECORD = "fedlight.held"  # the trained shared tensors of a client whose update a feature held back
EXTRAS_RECORD = "fedlight.extras"
UPDATE_METRIC = "update."  # prefix of the update's own metrics (ClientUpdate.metrics) in fedlight.metrics
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
    steps: int = 0  # local steps planned (bounds the losses a reply may report); 0: unchecked
    lost: bool = False  # the plan loses this client's update after training: only its losses count


@dataclass
class ScreenedReplies:
    """One round's replies after :func:`screen_replies`: updates for the engine's round and the rest."""

    updates: list[ClientUpdate] = field(default_factory=list)  # in plan order
    #: (client id, trained tensors) of updates a feature held back (malicious clients), in plan order
    held: list[tuple[int, State]] = field(default_factory=list)
    #: clients whose client-state store holds an entry after this round (on their node)
    stored: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # every local step's loss, in plan order
    rejected: dict[int | str, str] = field(default_factory=dict)  # client id / "node N" -> reason
    failed: dict[int, str] = field(default_factory=dict)  # client id -> reason (no reply, error reply, refused)


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


def _record_state(record: Any, job: FedlightJob, global_state: State, what: str) -> State:
    """An ArrayRecord of fp32 tensors with exactly the shipped names and the global state's shapes."""
    import torch

    if not isinstance(record, ArrayRecord):
        raise ReplyRejected(f"{what} is {type(record).__name__}, not an ArrayRecord")
    names = job.shared_names
    extra, missing = sorted(set(record) - set(names)), [n for n in names if n not in record]
    if missing or extra:
        raise ReplyRejected(f"{what}: missing tensors {missing[:5]}, unexpected tensors {extra[:5]}")
    fp32 = np.dtype(np.float32)
    return {
        name: torch.from_numpy(_npy_array(record[name], tuple(global_state[name].shape), fp32, f"{what}[{name}]"))
        for name in names
    }  # deltas are fp32 (state.subtract), on the wire and in aggregation


def _update_payload(record: Any, job: FedlightJob, global_state: State, arrays: bool) -> bytes:
    """The reply's update as uplink payload bytes; names, shapes and dtypes checked against the global state."""
    if not isinstance(record, ArrayRecord):
        raise ReplyRejected(f"{UPDATE_RECORD} is {type(record).__name__}, not an ArrayRecord")
    if not arrays:  # one uint8 Array: the uplink codec's payload, decoded and validated by ServerPipeline
        if len(record) != 1:
            raise ReplyRejected(f"{UPDATE_RECORD}: {len(record)} arrays, expected 1 (the codec payload)")
        (array,) = record.values()
        return _npy_array(array, None, np.dtype(np.uint8), UPDATE_RECORD).tobytes()
    return job.engine.client.uplink.encode(_record_state(record, job, global_state, UPDATE_RECORD))


def _extras(content: RecordDict, keys: set[str]) -> dict[str, bytes]:
    """Features' uplink extras as bytes (decoding them is each feature's ``screen``); unknown keys refused."""
    if EXTRAS_RECORD not in content.array_records:
        return {}
    record = content.array_records[EXTRAS_RECORD]
    unknown = sorted(set(record) - keys)
    if unknown:
        raise ReplyRejected(f"{EXTRAS_RECORD}: no round feature has the keys {unknown[:5]}")
    return {k: _npy_array(a, None, np.dtype(np.uint8), f"{EXTRAS_RECORD}[{k}]").tobytes() for k, a in record.items()}


def _finite(value: Any, what: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise ReplyRejected(f"{what} {value!r} is not a finite number")
    return float(value)


def _check_metadata(reply: Message, planned: PlannedReply, message_type: str = "train") -> None:
    meta = reply.metadata
    if meta.message_type != message_type:
        raise ReplyRejected(f"reply of type {meta.message_type!r} to a {message_type} message")
    if meta.group_id != str(planned.round_idx):
        raise ReplyRejected(f"reply for round {meta.group_id!r} in round {planned.round_idx} (stale or forged)")
    if planned.message_id and meta.reply_to_message_id != planned.message_id:
        raise ReplyRejected(
            f"reply to message {meta.reply_to_message_id!r}, not to this round's {planned.message_id!r}"
        )


@dataclass
class _Checked:
    losses: list[float]
    update: ClientUpdate | None = None
    held: State | None = None  # trained tensors of an update a feature held back (the server's feature sends it)
    stored: bool = False  # the client has an entry in its client-state store (what fedlight fit's store would hold)
    failed: str = ""


def _check_content(
    reply: Message, planned: PlannedReply, job: FedlightJob, global_state: State, backbone: str, arrays: bool
) -> _Checked:
    from fedlight.core.update import ClientUpdate

    content = reply.content
    for key, records, kind in (
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
    count = metrics["num-examples"]
    if type(count) is not int:
        raise ReplyRejected(f"num-examples is {type(count).__name__} {count!r}, not an int")
    if count <= 0:
        raise ReplyRejected(f"num-examples {count} is not positive")
    if count != planned.num_examples:
        raise ReplyRejected(f"claims {count} examples; the server planned {planned.num_examples} (its partition size)")
    loss = _finite(metrics["train_loss"], "train_loss")
    losses = metrics.get("losses", [loss])
    if not isinstance(losses, list) or (planned.steps and len(losses) > planned.steps):
        raise ReplyRejected(f"losses: {str(losses)[:60]} is not a list of at most {planned.steps} step losses")
    checked = _Checked([_finite(x, "a step loss") for x in losses])
    failed, held, stored = info.get("failed", ""), info.get("held", False), info.get("stored", False)
    if type(failed) is not str or type(held) is not bool or type(stored) is not bool:
        raise ReplyRejected(f"info: failed {failed!r} / held {held!r} / stored {stored!r}: not a string / bools")
    checked.stored = stored
    if planned.lost:  # its update never arrives (the plan's dropout after training): losses only
        return checked
    if failed:
        checked.failed = f"client reports: {failed}"
        return checked
    if held:  # a feature held the update back: the server's copy of that feature sends it at round end
        if HELD_RECORD not in content.array_records or UPDATE_RECORD in content.array_records:
            raise ReplyRejected(f"a held update comes as {HELD_RECORD!r} alone, not with {UPDATE_RECORD!r}")
        checked.held = _record_state(content.array_records[HELD_RECORD], job, global_state, HELD_RECORD)
        return checked
    if UPDATE_RECORD not in content.array_records:
        raise ReplyRejected(f"no ArrayRecord {UPDATE_RECORD!r} in the reply")
    payload = _update_payload(content.array_records[UPDATE_RECORD], job, global_state, arrays)
    extras = _extras(content, {f.key for f in job.engine.features})
    own = {
        k[len(UPDATE_METRIC) :]: _finite(v, k) for k, v in metrics.items() if k.startswith(UPDATE_METRIC)
    }  # the update's own metrics (ClientUpdate.metrics), e.g. a feature's update_norm
    # the planned count, never the claim (they are equal here, but only the server's figure is used)
    checked.update = ClientUpdate(planned.client_id, planned.num_examples, payload, own, extras)
    return checked


def screen_replies(
    replies: list[Message], planned: list[PlannedReply], job: FedlightJob, global_state: State, backbone: str
) -> ScreenedReplies:
    """Sort one round's ``train`` replies into trusted updates, rejections and failures; never raises for a reply.

    Per planned client (in plan order, as the in-process loop appends updates; a client whose update a
    feature held back sends its trained tensors instead, for the server's feature): no reply, an error reply or
    a client that reports it sent nothing is a *failure* (as a client whose training raised is
    in-process); a reply that is duplicated, stale, for another message or client, or malformed
    (missing records, tensors or metric keys, wrong types, shapes or dtypes, a count other than the
    planned one, another backbone) is a *rejection*, and so is every reply from a node that was not
    asked this round.
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
        if not got:
            out.failed[p.client_id] = "no reply within round-timeout"
            continue
        if len(got) > 1:
            out.rejected[p.client_id] = f"{len(got)} replies to one message: none is used"
            continue
        reply = got[0]
        try:
            _check_metadata(reply, p)
            if reply.has_error():
                out.failed[p.client_id] = f"error reply: {reply.error.reason}"
                continue
            checked = _check_content(reply, p, job, global_state, backbone, arrays)
        except ReplyRejected as err:
            out.rejected[p.client_id] = str(err)
            continue
        except Exception as err:  # noqa: BLE001 (whatever a hostile reply triggers is a rejection, not a crash)
            out.rejected[p.client_id] = f"malformed reply ({type(err).__name__}: {err})"
            continue
        out.losses.extend(checked.losses)
        if checked.stored:
            out.stored.append(p.client_id)
        if checked.failed:
            out.failed[p.client_id] = checked.failed
        elif checked.update is not None:
            out.updates.append(checked.update)
        elif checked.held is not None:
            out.held.append((p.client_id, checked.held))
    return out


def screen_answers(
    replies: list[Message], planned: list[PlannedReply], message_type: str, read: Any
) -> tuple[dict[int, Any], dict[int | str, str]]:
    """Replies to one kind of request besides ``train`` (``evaluate``, the SecAgg steps) -> (client id ->
    ``read(content)``, who -> why a reply is not used). One reply per asked node, of ``message_type``, for
    the round and message asked, naming the client asked; ``read`` raises for content it cannot use.
    Never raises for a reply."""
    answers: dict[int, Any] = {}
    refused: dict[int | str, str] = {}
    by_node: dict[Any, list[Message]] = {}
    for reply in replies:
        by_node.setdefault(getattr(getattr(reply, "metadata", None), "src_node_id", None), []).append(reply)
    for node in set(by_node) - {p.node_id for p in planned}:
        refused[f"node {node}"] = f"{message_type} reply from a node that was not asked"
    for p in planned:
        got = by_node.get(p.node_id, [])
        try:
            if len(got) != 1:
                raise ReplyRejected(f"{len(got)} replies to one {message_type} message")
            reply = got[0]
            _check_metadata(reply, p, message_type)
            if reply.has_error():
                raise ReplyRejected(f"error reply: {reply.error.reason}")
            claimed = reply.content.config_records[INFO_RECORD].get("client-id")
            if type(claimed) is not int or claimed != p.client_id:
                raise ReplyRejected(f"reply claims client-id {claimed!r}; the server asked client {p.client_id}")
            answers[p.client_id] = read(reply.content)
        except Exception as err:  # noqa: BLE001 (a bad answer leaves that client out, it never crashes the round)
            refused[p.client_id] = (
                str(err) if isinstance(err, ReplyRejected) else f"malformed ({type(err).__name__}: {err})"
            )
    return answers, refused


def ask(
    grid: Grid,
    job: FedlightJob,
    node_of: dict[int, int],
    round_idx: int,
    requests: dict[int, dict[str, Any]],
    message_type: str,
    read: Any,
    timeout: float,
) -> tuple[dict[int, Any], dict[int | str, str]]:
    """Send ``requests`` (client id -> records) as ``message_type`` messages of round ``round_idx`` and
    screen the replies (:func:`screen_answers`)."""
    clients = list(requests)
    messages = [
        Message(RecordDict(requests[c]), dst_node_id=node_of[c], message_type=message_type, group_id=str(round_idx))
        for c in clients
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout)) if messages else []
    planned = [
        PlannedReply(c, node_of[c], round_idx, job.population.client_sizes[c], str(m.metadata.message_id or ""))
        for c, m in zip(clients, messages, strict=True)
    ]  # the Grid set each message's id when it pushed it
    return screen_answers(replies, planned, message_type, read)


def _read_evaluation(content: RecordDict) -> dict[str, float]:
    record = content.metric_records[EVALUATION_RECORD]
    return {str(k): _finite(v, f"{EVALUATION_RECORD}[{k}]") for k, v in record.items()}


def evaluation_broadcasts(job: FedlightJob) -> dict[str, bytes]:
    """What features send a client before it evaluates (``evaluation_broadcast``, by feature key): the server
    changed more than the global state this round (base merging: the frozen base), and the client's copy
    must match the server's model that ``fedlight fit`` evaluates; the client applies each with the same
    feature's ``apply_broadcast``."""
    engine, found = job.engine, {}
    for feature in engine.features:
        make = getattr(feature, "evaluation_broadcast", None)
        if callable(make) and (payload := make(engine)):
            found[feature.key] = payload
    return found


def ask_clients_to_evaluate(grid: Grid, job: FedlightJob, node_of: dict[int, int], timeout: float) -> int:
    """After ``end_round``: every feature that evaluates on the clients (``client_evaluation``) asks the
    clients it names (``clients_due``) with the new global state and gets their values (``report``).

    Returns the bytes of global state those messages carried: traffic ``fedlight fit`` does not have (its
    server holds the clients' local tensors), so it is reported in a column of its own, never in
    ``downlink_bytes``."""
    engine, sent = job.engine, 0
    for feature in engine.features:
        if not getattr(feature, "client_evaluation", False):
            continue
        r = engine.round
        clients = feature.clients_due(engine, r)
        if not clients:
            continue
        state = state_to_record(engine.global_state)  # fp32: exact, whatever the codecs
        content: dict[str, Any] = {"fedlight.global": state}
        broadcasts = evaluation_broadcasts(job)
        if broadcasts:
            content[BROADCASTS_RECORD] = payloads_to_record(broadcasts)
        requests = {
            c: {**content, "fedlight.config": ConfigRecord({"round": r.round, "client-id": c, "feature": feature.key})}
            for c in clients
        }  # fmt: skip
        per_client = sum(len(a.data) for a in state.values()) + sum(len(b) for b in broadcasts.values())
        sent += len(clients) * per_client  # .npy bytes of the state, payload bytes of the broadcasts
        values, refused = ask(grid, job, node_of, r.round, requests, "evaluate", _read_evaluation, timeout)
        for who, reason in refused.items():
            label = who if isinstance(who, str) else f"client {who}"
            _log(f"round {r.round}: {feature.name}: evaluation of {label} not used: {reason}")
        feature.report(values)
    return sent


def _write_outputs(out: Path, global_state: State, history: list[dict[str, Any]]) -> None:
    """global_state.safetensors, rounds.json and rounds.csv (fedlight's writer), each replaced atomically."""
    from safetensors.torch import save

    from fedlight.core.runlog import ROUNDS_CSV, write_csv
    from fedlight.core.storage import atomic_write, atomic_write_text

    data = save({k: v.detach().contiguous() for k, v in global_state.items()})
    atomic_write(out / "global_state.safetensors", lambda f: f.write(data))
    atomic_write_text(out / "rounds.json", json.dumps(history, indent=1))
    write_csv(history, out / ROUNDS_CSV)


def _privacy_state(job: FedlightJob) -> str:
    """The privacy plugin's state (e.g. an adaptive clip bound) for the clients' copies; '' when stateless."""
    state = job.engine.privacy.state_dict()
    return json.dumps(state) if state else ""


def _due(every: int, round_idx: int, rounds: int) -> bool:
    return bool(every) and (round_idx % every == 0 or round_idx == rounds)


def _log(message: str) -> None:
    print(f"[fedlight-flower] {message}", flush=True)


def charge_private_steps(job: FedlightJob) -> None:
    """Per-example privacy (DP-SGD): the server's accountant is charged from the server's own plan, before
    ``end_round`` composes it: every client asked to train takes its planned steps on batches of
    ``min(batch_size, n)`` examples (what ``RoundBatchSampler`` draws and ``private_step`` counts
    in-process). No client report is trusted; a client that fails mid-round is charged in full."""
    record = getattr(job.engine.privacy, "record_steps", None)
    if record is None:
        return
    plan, pop = job.engine.round.plan, job.population
    for client, steps in zip(plan.training, plan.steps, strict=True):
        size = min(pop.batch_size, pop.client_sizes[client])
        if steps > 0 and size > 0:
            record(client, size, steps)


def run_server(grid: Grid, job: FedlightJob, out: Path | None, round_timeout: float, nodes_timeout: float) -> State:
    """The federated loop on the engine: ``begin_round`` -> a ``train`` message per client -> screened
    replies into the round -> ``end_round`` -> validation -> ``round_row``; round checkpoints and
    adapter exports as ``federation.checkpoint_every`` / ``export_every`` say (under ``out``)."""
    from fedlight.core.export import export_adapter

    engine, options = job.engine, job.federation.options
    node_of = map_clients(grid, job.num_clients, nodes_timeout)
    arrays = uses_arrays(job)
    session = getattr(engine.client, "session", None)  # secure aggregation: its steps become messages
    if session is not None:
        from functools import partial

        from fedlight_flower.secure import FlowerSecureRound

        session.make_round = partial(FlowerSecureRound, grid, job, node_of, round_timeout)
    backbone = job.backbone_fingerprint()
    if job.start_round == 1 and not engine.history and options.eval_before_training:
        engine.append_row({"round": 0, "num_clients": 0, **job.evaluate()})
        if out is not None:
            _write_outputs(out, engine.global_state, engine.history)
    elif job.start_round > 1:
        _log(f"resuming after round {job.start_round - 1}")
        lost = job.client_state_kinds()
        if lost:
            _log(
                f"warning: client-side state ({', '.join(lost)}) lives in each node's Context.state and does "
                "not survive a new run; clients continue from an empty store (docs/flower.md, Resume)"
            )
    for round_idx in range(job.start_round, job.rounds + 1):
        r = engine.begin_round(round_idx)
        global_state, plan = engine.global_state, r.plan
        if arrays:
            broadcast = state_to_record(engine.client.receive(r.payload))
        else:
            broadcast = bytes_to_record(r.payload)
        content = {"fedlight.global": broadcast}
        if r.broadcasts:
            content[BROADCASTS_RECORD] = payloads_to_record(r.broadcasts)
        privacy_state = _privacy_state(job)
        messages = []
        for c, steps in zip(plan.training, plan.steps, strict=True):
            config = {
                "round": round_idx, "client-id": c, "steps": steps, "lost": c in plan.lost, "batches": plan.batches,
                "seed": engine.seed, "data-seed": job.data_seed, "privacy-state": privacy_state,
            }  # fmt: skip
            record = RecordDict({**content, "fedlight.config": ConfigRecord(config)})
            if session is not None:  # the bundles routed to this client and U1
                record["fedlight.secagg"] = ConfigRecord(session.current().train_request(c))
            messages.append(Message(record, dst_node_id=node_of[c], message_type="train", group_id=str(round_idx)))
        # what each client receives, counted as the engine's start_client and the features count it
        r.downlink += len(messages) * (len(r.payload) + sum(len(b) for b in r.broadcasts.values()))
        replies = list(grid.send_and_receive(messages, timeout=round_timeout))
        planned = [
            PlannedReply(
                c,
                node_of[c],
                round_idx,
                job.population.client_sizes[c],
                str(msg.metadata.message_id or ""),
                steps,
                c in plan.lost,
            )
            for c, steps, msg in zip(plan.training, plan.steps, messages, strict=True)
        ]  # the Grid set each message's id when it pushed it
        screened = screen_replies(replies, planned, job, global_state, backbone)
        for client_id, reason in screened.failed.items():
            _log(f"round {round_idx}: client {client_id} failed: {reason}")
        r.updates.extend(screened.updates)
        for client_id in screened.stored:  # which clients hold state: what the store's keys are in-process
            engine.client_store.setdefault(client_id, {})
        for client_id, trained in screened.held:  # the server's features send them at before_aggregate
            if not job.hold(client_id, trained):
                screened.rejected[client_id] = "sent a held update, but no round feature holds this client's update"
        r.rejected.update(screened.rejected)
        r.failed.update(screened.failed)
        r.losses.extend(screened.losses)
        r.clients_done = len(plan.training)
        charge_private_steps(job)
        engine.end_round()
        if session is not None:  # a crafted update its attacker's node did not mask (secagg_mask)
            r.failed.update(getattr(session.current(), "unmasked", {}))
        for who, reason in r.report.rejected.items():
            label = who if isinstance(who, str) else f"client {who}"
            _log(f"round {round_idx}: rejected reply of {label}: {reason}")
        if r.skipped:
            _log(f"round {round_idx}: {r.skipped}; round skipped, global model unchanged")
        evaluate_bytes = ask_clients_to_evaluate(grid, job, node_of, round_timeout)
        row = engine.round_row(job.evaluate())
        if evaluate_bytes:
            row["client_evaluate_downlink_bytes"] = evaluate_bytes
        _log(json.dumps(row))
        if out is not None:  # after every round: a killed run still leaves its last global state
            _write_outputs(out, engine.global_state, engine.history)
            if _due(options.checkpoint_every, round_idx, job.rounds):
                path = out / "checkpoints" / f"round-{round_idx:04d}.ckpt"
                job.save_checkpoint(path)
                from fedlight.core.storage import atomic_copy

                atomic_copy(path, out / "checkpoints" / "last.ckpt")
            if _due(options.export_every, round_idx, job.rounds):
                adapter = out / "adapters" / f"round-{round_idx:04d}"
                export_adapter(job.module, adapter, merged=options.export_merged, base_delta=engine.frozen_changes())
        reason = engine.stop_reason()
        if reason:
            _log(f"stopping after round {round_idx}: {reason}")
            break
    return engine.global_state


def build_server_app(config: str | None = None, out: str | None = None) -> ServerApp:
    """A ServerApp for ``config`` (or, when None, the run config's ``config``/``out``; ``resume``: a
    fedlight-flower round checkpoint to continue from)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from fedlight_flower.job import FedlightJob

        path = _config_path(context, config)
        resume = context.run_config.get(RESUME_KEY) or None
        job = FedlightJob(path, resume=str(resume)) if resume else get_job(path)
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
