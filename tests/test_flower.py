"""fedlight on Flower (plugins/fedlight-flower): same result as `fedlight fit`, and a real local deployment.

Skipped where flwr or the plugin is not installed; CI installs both (``.ci/run``, ``tox.ini``).
"""

from __future__ import annotations

import io
import math
import os
import random
import time
import uuid
from pathlib import Path

import pytest
import yaml

flwr = pytest.importorskip("flwr")
pytest.importorskip("fedlight_flower")

import numpy as np
import torch
from conftest import round_callback, run_fit, vision_config
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedlight.errors import ConfigError


def flower_config(tmp_path: Path, **overrides) -> dict:
    """Tiny ViT on digits, bias-only tuning with a *local* head (so Context.state carries per-client tensors)."""
    base = {
        "model": {"peft": {"class_path": "bitfit", "init_args": {"head": "local"}}},
        "data": {"num_clients": 3},
        "federation": {"rounds": 2, "clients_per_round": 2, "local_steps": 2, "checkpoint_every": 0},
    }
    cfg = vision_config(tmp_path, **base)
    from conftest import merge

    return merge(cfg, overrides)


def write(cfg: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def flower_message_env(monkeypatch):
    """What a ServerApp process has (Message() reads it), so messages can be built in this process."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)


def in_process_state(cfg: dict, tmp_path: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """`fedlight fit` in this process with one intra-op thread, as each Flower client actor runs (Ray
    sets OMP_NUM_THREADS=1), so the float reductions are the same and the states are bit-identical."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fed = round_callback(run_fit(cfg, tmp_path))
    finally:
        torch.set_num_threads(threads)
    return fed.global_state, fed.history


SIMULATED = {
    "plain": {},
    # SecAgg's query.* steps, the evaluate messages and Context.state through Ray's actors
    "secure_aggregation+personal_eval": {
        "federation": {
            "secure_aggregation": {"class_path": "fedlight.privacy.secure_round.SecureAggregation"},
            "aggregator": {"class_path": "fedavg", "init_args": {"weighting": "uniform"}},
            "personal_eval_every": 1,
        }
    },
}


@pytest.mark.parametrize(
    "case", ["plain", pytest.param("secure_aggregation+personal_eval", marks=pytest.mark.slow)]
)
def test_flower_simulation_equals_in_process(tmp_path, case):
    """Same seed, same sampled clients: the Simulation Runtime's final trainable state == `fedlight fit`'s."""
    from fedlight_flower.cli import simulate

    cfg = flower_config(tmp_path, **SIMULATED[case])
    expected, history = in_process_state(cfg, tmp_path / "inproc")
    out = tmp_path / "sim"
    got = simulate(write(cfg, tmp_path / "flower.yaml"), out, cpus_per_client=1, num_cpus=1)
    assert list(got) == list(expected)
    for name in expected:
        torch.testing.assert_close(got[name].float(), expected[name].float(), rtol=0, atol=1e-6)
    rows = yaml.safe_load((out / "rounds.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2]
    for ours, theirs in zip(rows, history):  # same per-round validation and byte counts
        assert ours["num_clients"] == theirs["num_clients"]
        assert ours["uplink_bytes"] == theirs["uplink_bytes"]
        assert ours["val_acc"] == pytest.approx(theirs["val_acc"], abs=1e-6)
        assert ours["downlink_bytes"] == theirs["downlink_bytes"]
        for key in (k for k in theirs if "personal" in k):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-12), key
    from safetensors.torch import load_file

    saved = load_file(str(out / "global_state.safetensors"))
    assert all(torch.equal(saved[k], got[k]) for k in got)
    assert (out / "rounds.csv").read_text().startswith("round,num_clients,rejected,dropped,failed,uplink_bytes")


class InMemoryGrid:
    """A Flower ``Grid`` that delivers each message to a ClientApp in this process, one ``Context`` per node
    (Flower's node state), so the message protocol runs without Ray or a SuperLink. Like Flower's own grids
    it gives every pushed message an id, which the ClientApp's reply refers to; ``deliver`` is the wire
    (subclasses tamper with it)."""

    def __init__(self, client_app, num_nodes: int, run_config: dict) -> None:
        from flwr.app import Context, RecordDict

        self.app = client_app
        self.contexts = {
            1000 + k: Context(1, 1000 + k, {"partition-id": k, "num-partitions": num_nodes}, RecordDict(), run_config)
            for k in range(num_nodes)
        }
        self.sent: list[str] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as flwr's InMemoryGrid.push_messages
            self.sent.append(msg.metadata.message_type)
            replies.extend(self.deliver(msg, self.app(msg, self.contexts[msg.metadata.dst_node_id])))
        return replies

    def deliver(self, msg, reply) -> list:
        return [reply]


def test_protocol_with_codec_error_feedback_privacy_and_dropouts_matches_in_process(tmp_path, monkeypatch):
    """The ServerApp/ClientApp protocol (Context.state residuals, codec payload bytes, privacy state to the
    clients, dropouts) gives `fedlight fit`'s exact result; the client side is a separate job instance."""
    from fedlight_flower import apps
    from fedlight_flower.job import FedlightJob

    cfg = flower_config(
        tmp_path,
        data={"num_clients": 4},
        federation={
            "rounds": 3, "clients_per_round": 3, "local_steps": 1,
            "uplink_codec": {"class_path": "int8", "init_args": {"error_feedback": True}},
            "aggregator": {"class_path": "fedavg", "init_args": {"weighting": "uniform"}},
            "privacy": {"class_path": "dp_fedavg", "init_args": {"noise_multiplier": 0.5, "clip_norm": 0.5, "adaptive_clipping": True, "clipped_count_stddev": 1.0}},
            "faults": {"dropout_before": 0.2, "dropout_after": 0.2},
        },
    )  # fmt: skip
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # what a ServerApp process has; Message() reads it
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)
    fed = round_callback(run_fit(cfg, tmp_path / "inproc"))
    config = write(cfg, tmp_path / "flower.yaml")
    server_job = FedlightJob(config)
    grid = InMemoryGrid(apps.build_client_app(str(config)), 4, {})
    got = apps.run_server(grid, server_job, tmp_path / "out", round_timeout=60, nodes_timeout=5)
    assert apps.get_job(str(config)) is not server_job  # clients did not share the server's objects
    for name, value in fed.global_state.items():
        assert torch.equal(got[name], value), name
    residuals = [c.state.array_records.get("fedlight.state.residual") for c in grid.contexts.values()]
    assert any(r is not None for r in residuals)  # error feedback lives in Flower's node state
    assert grid.sent.count("query") == 4
    rows = yaml.safe_load((tmp_path / "out" / "rounds.json").read_text())
    _rows_match(rows, fed.history)  # lost clients train too (their losses and downlink count, as in-process)
    assert sum(r.get("dropped", 0) for r in rows) > 0  # the faults really fired


# --- hostile replies: the server decides, not the client ------------------------------------------

UNKNOWN_NODE = 4242


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _tampered(msg, reply, **records):
    """A reply to ``msg`` with ``reply``'s records, some replaced (``fedlight_x=None`` removes ``fedlight.x``)."""
    content = dict(reply.content.items())
    for key, value in records.items():
        key = key.replace("_", ".")
        if value is None:
            content.pop(key, None)
        else:
            content[key] = value
    return Message(RecordDict(content), reply_to=msg)


def _foreign_node(msg, rng) -> int:
    """A node id nobody was asked from, distinct per client (the screen counts one rejection per foreign node)."""
    client = int(msg.content.config_records["fedlight.config"]["client-id"])
    return UNKNOWN_NODE + 1000 * client + rng.randrange(1000)


def _with_meta(reply, **fields):
    for name, value in fields.items():
        reply.metadata.__dict__[f"_{name}"] = value  # what a forged or replayed message would carry
    return reply


def _edit(kind: str, change):
    """A tamper that copies one record of the reply (metrics or info) and applies ``change(dict, rng)``."""

    def tamper(msg, reply, rng):
        if kind == "metrics":
            values = dict(reply.content.metric_records["fedlight.metrics"].items())
            change(values, rng)
            return [_tampered(msg, reply, fedlight_metrics=MetricRecord(values))]
        values = dict(reply.content.config_records["fedlight.info"].items())
        change(values, rng)
        return [_tampered(msg, reply, fedlight_info=ConfigRecord(values))]

    return tamper


def _arrays(change):
    """A tamper that copies the update's arrays and applies ``change(dict of Array, rng)``."""

    def tamper(msg, reply, rng):
        arrays = dict(reply.content.array_records["fedlight.update"].items())
        change(arrays, rng)
        return [_tampered(msg, reply, fedlight_update=ArrayRecord(arrays))]

    return tamper


def _one_array(make):
    """Replace one random tensor by ``make(ndarray, rng)`` (a Flower Array)."""

    def change(arrays, rng):
        name = rng.choice(sorted(arrays))
        arrays[name] = make(arrays[name].numpy(), rng)

    return _arrays(change)


def _raw(dtype, shape, data, stype="numpy.ndarray"):
    return Array(dtype=dtype, shape=tuple(shape), stype=stype, data=data)


def _wrong_shape(a, rng):
    shape = a.shape
    while shape == a.shape:
        shape = tuple(rng.randint(0, 5) for _ in range(rng.randint(0, 3)))  # zero dimensions included
    return Array(np.zeros(shape, np.float32))


def _nonfinite(a, rng):
    a = a.copy()
    a.reshape(-1)[rng.randrange(a.size)] = rng.choice([np.nan, np.inf, -np.inf])
    return Array(a)


def _header_lies(a, rng):
    """An .npy header claiming a huge array over 4 bytes: refused before numpy would allocate it."""
    data = _npy(np.zeros(1, np.float32)).replace(b"(1,)", f"({rng.choice([10**9, 2**40])},)".encode())
    return _raw("float32", a.shape, data)


def _forge_count(values, rng):
    values["num-examples"] += rng.choice([1, -1, 7, 10**6])


def _set(key, choices):
    return lambda values, rng: values.__setitem__(key, rng.choice(choices(values)))


def _pop(key):
    return lambda values, rng: values.pop(key)


def _drop_record(key):
    return lambda msg, reply, rng: [_tampered(msg, reply, **{key: None})]


def _swap_record(key, make):
    return lambda msg, reply, rng: [_tampered(msg, reply, **{key: make(reply, rng)})]


#: (name, tamper(train message, honest reply, rng) -> replies delivered instead, excluded (the client's
#: honest update must not be aggregated), rows it adds to `rejected`, rows it adds to `failed`)
REPLY_CASES = [
    ("no update record", _drop_record("fedlight_update"), True, 1, 0),
    ("no metrics record", _drop_record("fedlight_metrics"), True, 1, 0),
    ("no info record", _drop_record("fedlight_info"), True, 1, 0),
    ("metrics sent as a ConfigRecord", _swap_record("fedlight_metrics", lambda r, g: ConfigRecord(dict(r.content.metric_records["fedlight.metrics"].items()))), True, 1, 0),
    ("empty update record", _swap_record("fedlight_update", lambda r, g: ArrayRecord()), True, 1, 0),
    ("codec bytes in array mode", _swap_record("fedlight_update", lambda r, g: ArrayRecord([np.frombuffer(g.randbytes(64), np.uint8).copy()])), True, 1, 0),
    ("a tensor missing", _arrays(lambda a, g: a.pop(g.choice(sorted(a)))), True, 1, 0),
    ("an unexpected tensor", _arrays(lambda a, g: a.__setitem__(g.choice(["evil", "model.x.weight"]), Array(np.ones(3, np.float32)))), True, 1, 0),
    ("wrong shape", _one_array(_wrong_shape), True, 1, 0),
    ("wrong dtype", _one_array(lambda a, g: Array(a.astype(g.choice([np.float64, np.float16, np.int32, np.uint8])))), True, 1, 0),
    ("NaN/Inf value", _one_array(_nonfinite), True, 1, 0),
    ("npy header claims a huge array", _one_array(_header_lies), True, 1, 0),
    ("truncated npy data", _one_array(lambda a, g: _raw("float32", a.shape, _npy(a)[: g.randrange(len(_npy(a)))])), True, 1, 0),
    ("random bytes as data", _one_array(lambda a, g: _raw("float32", a.shape, g.randbytes(g.randrange(1, 300)))), True, 1, 0),
    ("not numpy-serialised", _one_array(lambda a, g: _raw("float32", a.shape, _npy(a), g.choice(["torch", "pickle"]))), True, 1, 0),
    ("Array metadata disagrees with data", _one_array(lambda a, g: _raw("float64", a.shape, _npy(a))), True, 1, 0),
    ("num-examples missing", _edit("metrics", _pop("num-examples")), True, 1, 0),
    ("train_loss missing", _edit("metrics", _pop("train_loss")), True, 1, 0),
    ("count differs from the plan", _edit("metrics", _forge_count), True, 1, 0),
    ("count zero or negative", _edit("metrics", _set("num-examples", lambda v: [0, -1, -(10**9)])), True, 1, 0),
    ("count as a float", _edit("metrics", _set("num-examples", lambda v: [float(v["num-examples"])])), True, 1, 0),
    ("count as a list", _edit("metrics", _set("num-examples", lambda v: [[v["num-examples"]]])), True, 1, 0),
    ("train_loss NaN/Inf/list", _edit("metrics", _set("train_loss", lambda v: [math.nan, math.inf, [1.0]])), True, 1, 0),
    ("claims another client", _edit("info", _set("client-id", lambda v: [c for c in range(4) if c != v["client-id"]])), True, 1, 0),
    ("client-id of a wrong type", _edit("info", _set("client-id", lambda v: [str(v["client-id"]), 0.0, True])), True, 1, 0),
    ("client-id missing", _edit("info", _pop("client-id")), True, 1, 0),
    ("another backbone", _edit("info", _set("backbone", lambda v: ["0" * 16, v["backbone"][::-1], 7])), True, 1, 0),
    ("the same reply twice", lambda m, r, g: [r, r], True, 1, 0),
    ("two different replies", lambda m, r, g: [r, *_edit("metrics", _forge_count)(m, r, g)], True, 1, 0),
    ("from a node never asked", lambda m, r, g: [_with_meta(r, src_node_id=_foreign_node(m, g))], True, 1, 1),
    ("plus a copy from a node never asked", lambda m, r, g: [r, _with_meta(_tampered(m, r), src_node_id=_foreign_node(m, g))], False, 1, 0),
    ("stale round", lambda m, r, g: [_with_meta(r, group_id=str(int(r.metadata.group_id) - g.randint(1, 3)))], True, 1, 0),
    ("reply to another message", lambda m, r, g: [_with_meta(r, reply_to_message_id=uuid.UUID(int=g.getrandbits(128)).hex)], True, 1, 0),
    ("wrong message type", lambda m, r, g: [_with_meta(r, message_type=g.choice(["query", "evaluate"]))], True, 1, 0),
    ("error reply", lambda m, r, g: [Message(Error(code=0, reason="boom"), reply_to=m)], True, 0, 1),
    ("no reply", lambda m, r, g: [], True, 0, 1),
]


def hostile_schedule(num_clients: int, cases_per_kind: int, seed: int) -> dict[tuple[int, int], int]:
    """(round, client) -> case index: every case ``cases_per_kind`` times, shuffled, one honest client per round."""
    rng = random.Random(seed)
    cases = [i for i in range(len(REPLY_CASES)) for _ in range(cases_per_kind)]
    rng.shuffle(cases)
    schedule: dict[tuple[int, int], int] = {}
    round_idx = 0
    while cases:
        round_idx += 1
        honest = rng.randrange(num_clients)
        for client in range(num_clients):
            if client != honest and cases:
                schedule[(round_idx, client)] = cases.pop()
    return schedule


class HostileGrid(InMemoryGrid):
    """Runs the real ClientApp, then delivers what ``schedule`` says for that (round, client) instead of its
    reply. ``reference=True``: the same training, but a tampered client's reply simply never arrives when the
    case excludes it (what a correct server must end up aggregating)."""

    def __init__(self, *args, schedule, seed, reference=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.schedule, self.reference, self.seed = schedule, reference, seed

    def deliver(self, msg, reply):
        if msg.metadata.message_type != "train":
            return [reply]
        cfg = msg.content.config_records["fedlight.config"]
        key = (int(cfg["round"]), int(cfg["client-id"]))
        if key not in self.schedule:
            return [reply]
        _, tamper, excluded, _, _ = REPLY_CASES[self.schedule[key]]
        if self.reference:
            return [] if excluded else [reply]
        return tamper(msg, reply, random.Random(hash((self.seed, *key))))


@pytest.mark.parametrize(
    ("cases_per_kind", "seed"), [(1, 15), pytest.param(4, 16, marks=pytest.mark.slow)], ids=["each-once", "each-4x"]
)
def test_malformed_replies_are_rejected_never_crash_never_accepted(
    tmp_path, capsys, flower_message_env, cases_per_kind, seed
):
    """A seeded table of hostile replies (every case in REPLY_CASES, random parameters) driven through
    the real ServerApp loop and ClientApp: no exception escapes, each round counts exactly the expected
    rejections and failures (reasons logged), and the final global state is bit-identical to a run whose
    tampered replies simply never arrived, so nothing malformed was aggregated."""
    from fedlight_flower import apps
    from fedlight_flower.job import FedlightJob

    cfg = flower_config(
        tmp_path,
        data={"num_clients": 4},
        federation={"clients_per_round": 4, "local_steps": 1, "eval_before_training": False},
    )
    schedule = hostile_schedule(4, cases_per_kind, seed)
    rounds = max(r for r, _ in schedule)
    cfg["federation"]["rounds"] = rounds
    config = write(cfg, tmp_path / "flower.yaml")
    client_app = apps.build_client_app(str(config))
    results = {}
    for mode in ("reference", "hostile"):  # a fresh server job each: run_server starts from the job's model
        grid = HostileGrid(client_app, 4, {}, schedule=schedule, seed=seed, reference=(mode == "reference"))
        state = apps.run_server(grid, FedlightJob(config), tmp_path / mode, round_timeout=60, nodes_timeout=5)
        results[mode] = (state, yaml.safe_load((tmp_path / mode / "rounds.json").read_text()))
    log = capsys.readouterr().out
    (state, rows), (ref_state, ref_rows) = results["hostile"], results["reference"]
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    for row, ref in zip(rows, ref_rows):
        cases = [REPLY_CASES[i] for (r, _), i in schedule.items() if r == row["round"]]
        assert row["rejected"] == sum(c[3] for c in cases), (row["round"], [c[0] for c in cases])
        assert row["failed"] == sum(c[4] for c in cases), (row["round"], [c[0] for c in cases])
        assert row["num_clients"] == ref["num_clients"] == 4 - sum(c[2] for c in cases)
        assert ref["rejected"] == 0
    for name, value in ref_state.items():
        assert torch.equal(state[name], value), name  # no malformed reply changed the aggregate
    tried = len(schedule)
    rejected = sum(r["rejected"] for r in rows)
    assert log.count("rejected reply of") == rejected  # every rejection is logged with its reason
    assert "the server planned" in log and "not asked this round" in log and "replies to one message" in log
    with capsys.disabled():
        print(f"\nmalformed replies tried {tried}: rejections {rejected}, failures {sum(r['failed'] for r in rows)}, crashes 0")


def test_codec_payload_replies_are_screened(tmp_path, monkeypatch, flower_message_env):
    """With a non-identity uplink codec the update is one uint8 Array of codec bytes: a wrong dtype, shape or
    count of arrays is refused by the screen, garbage bytes by ServerPipeline; the round goes on."""
    from fedlight_flower import apps
    from fedlight_flower.job import FedlightJob

    def payload(make):
        return _swap_record("fedlight_update", lambda r, g: make(r.content.array_records["fedlight.update"], g))

    def only(rec):
        return next(iter(rec.values())).numpy()

    cases = [
        payload(lambda rec, g: ArrayRecord([only(rec).astype(np.float32)])),
        payload(lambda rec, g: ArrayRecord([only(rec).reshape(1, -1)])),
        payload(lambda rec, g: ArrayRecord([only(rec), only(rec)])),
        payload(lambda rec, g: ArrayRecord([only(rec)[: g.randrange(only(rec).size)]])),  # truncated payload
        payload(lambda rec, g: ArrayRecord([np.frombuffer(g.randbytes(only(rec).size), np.uint8).copy()])),
    ]
    cfg = flower_config(
        tmp_path,
        data={"num_clients": 3},
        federation={
            "rounds": len(cases), "clients_per_round": 3, "local_steps": 1, "eval_before_training": False,
            "uplink_codec": {"class_path": "int8"},
        },
    )  # fmt: skip
    config = write(cfg, tmp_path / "flower.yaml")

    class Grid(InMemoryGrid):
        def deliver(self, msg, reply):
            if msg.metadata.message_type != "train":
                return [reply]
            cfg = msg.content.config_records["fedlight.config"]
            if int(cfg["client-id"]) == 0:
                return cases[int(cfg["round"]) - 1](msg, reply, random.Random(int(cfg["round"])))
            return [reply]

    apps.run_server(Grid(apps.build_client_app(str(config)), 3, {}), FedlightJob(config), tmp_path / "out", 60, 5)
    rows = yaml.safe_load((tmp_path / "out" / "rounds.json").read_text())
    assert [(r["rejected"], r["num_clients"], r["failed"]) for r in rows] == [(1, 2, 0)] * len(cases)


def _edit_record(record: str, change):
    """A tamper that copies the reply's ``record`` config record and applies ``change(dict, rng)``."""

    def tamper(msg, reply, rng):
        values = dict(reply.content.config_records[record].items())
        change(values, rng)
        return [_tampered(msg, reply, **{record.replace(".", "_"): ConfigRecord(values)})]

    return tamper


def _evaluate_info(change):
    return _edit_record("fedlight.info", change)


#: hostile answers to an `evaluate` message (personalised evaluation): each leaves that client's value out
EVALUATE_CASES = [
    ("non-finite value", lambda m, r, g: [_tampered(m, r, fedlight_evaluation=MetricRecord({"value": g.choice([math.nan, math.inf, -math.inf])}))]),
    ("value as a list", lambda m, r, g: [_tampered(m, r, fedlight_evaluation=MetricRecord({"value": [g.random()]}))]),
    ("claims another client", _evaluate_info(lambda v, g: v.__setitem__("client-id", v["client-id"] + g.randint(1, 3)))),
    ("client-id as a string", _evaluate_info(lambda v, g: v.__setitem__("client-id", str(v["client-id"])))),
    ("no evaluation record", _drop_record("fedlight_evaluation")),
    ("two replies", lambda m, r, g: [r, _tampered(m, r)]),
    ("no reply", lambda m, r, g: []),
    ("error reply", lambda m, r, g: [Message(Error(code=0, reason="boom"), reply_to=m)]),
    ("wrong message type", lambda m, r, g: [_with_meta(r, message_type=g.choice(["train", "query"]))]),
    ("stale round", lambda m, r, g: [_with_meta(r, group_id=str(int(r.metadata.group_id) - 1))]),
]  # fmt: skip


def _held_as_update(msg, reply, rng):
    """A held reply that also carries an update record (a held update comes alone)."""
    held = reply.content.array_records["fedlight.held"]
    return [_tampered(msg, reply, fedlight_update=ArrayRecord(dict(held.items())))]


def _held_wrong_shape(msg, reply, rng):
    arrays = dict(reply.content.array_records["fedlight.held"].items())
    name = rng.choice(sorted(arrays))
    arrays[name] = _wrong_shape(arrays[name].numpy(), rng)
    return [_tampered(msg, reply, fedlight_held=ArrayRecord(arrays))]


def _honest_claims_held(msg, reply, rng):
    """An honest client's update re-sent as a held update: no server feature holds it."""
    info = dict(reply.content.config_records["fedlight.info"].items())
    info["held"] = True
    update = reply.content.array_records["fedlight.update"]
    return [_tampered(msg, reply, fedlight_update=None, fedlight_held=ArrayRecord(dict(update.items())), fedlight_info=ConfigRecord(info))]  # fmt: skip


def test_held_and_evaluate_replies_are_screened(tmp_path, capsys, flower_message_env):
    """The two new reply kinds (a malicious client's held tensors; a personalised evaluation) are screened:
    a malformed held reply or one no server feature holds is a rejection, a hostile evaluation leaves only
    that client out of the personal statistics (seeded choice of the cases); nothing crashes the round."""
    from fedlight_flower import apps
    from fedlight_flower.job import FedlightJob

    rounds = 3
    cfg = flower_config(
        tmp_path,
        data={"num_clients": 4},
        federation={
            "rounds": rounds, "clients_per_round": 4, "local_steps": 1, "eval_before_training": False,
            "attack": "alie", "malicious_fraction": 0.5, "personal_eval_every": 1,
        },
    )  # fmt: skip
    config = write(cfg, tmp_path / "flower.yaml")
    rng = random.Random(23)
    held_cases = [_held_as_update, _held_wrong_shape, _honest_claims_held]
    evaluate_cases = rng.sample(EVALUATE_CASES, k=rounds)  # one hostile evaluation per round

    class Grid(InMemoryGrid):
        def deliver(self, msg, reply):
            if msg.metadata.message_type == "query":
                return [reply]
            cfg = msg.content.config_records["fedlight.config"]
            round_idx, client = int(cfg["round"]), int(cfg["client-id"])
            g = random.Random(hash((round_idx, client)))
            kind = msg.metadata.message_type
            if kind == "evaluate" and client == target:
                return evaluate_cases[round_idx - 1][1](msg, reply, g)
            if kind == "train" and reply.content.config_records["fedlight.info"]["held"] == (round_idx != 3):
                if client == min(c for c in range(4) if (c in malicious) == (round_idx != 3)):
                    return held_cases[round_idx - 1](msg, reply, g)
            return [reply]

    job = FedlightJob(config)
    malicious = job.engine.feature("malicious_clients").malicious
    assert len(malicious) == 2
    target = max(set(range(4)) - malicious)  # an honest client whose train replies are never tampered
    apps.run_server(Grid(apps.build_client_app(str(config)), 4, {}), job, tmp_path / "out", 60, 5)
    rows = yaml.safe_load((tmp_path / "out" / "rounds.json").read_text())
    log = capsys.readouterr().out
    assert [r["rejected"] for r in rows] == [1, 1, 1]
    assert [r["num_clients"] for r in rows] == [3, 3, 3]
    # rounds 1-2: 3 clients with state (one malicious client's held replies were rejected, so it never had
    # an update), round 3: all 4 (the honest client rejected then had state already); one evaluation left out
    assert [r["personal_clients"] for r in rows] == [2.0, 2.0, 3.0]
    assert log.count(f"evaluation of client {target} not used") == rounds
    assert "a held update comes as" in log and "no round feature holds" in log and "expected float32" in log


def _secagg_edit(change):
    return _edit_record("fedlight.secagg", change)


#: hostile answers to a `secagg_mask` request (a crafted update sent back to its attacker's node to mask)
MASK_CASES = [
    ("no reply", lambda m, r, g: []),
    ("error reply", lambda m, r, g: [Message(Error(code=0, reason="boom"), reply_to=m)]),
    ("masked vector cut short", _secagg_edit(lambda v, g: v.__setitem__("masked", v["masked"][: g.randrange(len(v["masked"]))]))),
    ("masked vector as a string", _secagg_edit(lambda v, g: v.__setitem__("masked", v["masked"].hex()))),
    ("claims another client", lambda m, r, g: [_tampered(m, r, fedlight_info=ConfigRecord({"client-id": (int(r.content.config_records["fedlight.info"]["client-id"]) + 1) % 4}))]),
]  # fmt: skip


def test_mask_replies_are_screened(tmp_path, capsys, flower_message_env):
    """An attack under secure aggregation: a hostile or missing answer to the mask step (every case, one
    per round in a seeded order) leaves that attacker's update out, as a client that sent nothing; its masks are
    then removed with its revealed key like a dropout's, so the round still aggregates the rest."""
    from fedlight_flower import apps
    from fedlight_flower.job import FedlightJob

    rounds = len(MASK_CASES)
    cfg = flower_config(
        tmp_path,
        data={"num_clients": 4},
        federation={
            "rounds": rounds, "clients_per_round": 4, "local_steps": 1, "eval_before_training": False,
            "attack": "sign_flip", "malicious_fraction": 0.5,
            "secure_aggregation": {"class_path": "fedlight.privacy.secure_round.SecureAggregation"},
            "aggregator": {"class_path": "fedavg", "init_args": {"weighting": "uniform"}},
        },
    )  # fmt: skip
    config = write(cfg, tmp_path / "flower.yaml")
    cases = random.Random(5).sample(MASK_CASES, k=rounds)  # every case, in a seeded order

    class Grid(InMemoryGrid):
        def deliver(self, msg, reply):
            if msg.metadata.message_type != "query.secagg_mask":
                return [reply]
            record = msg.content.config_records["fedlight.secagg"]
            round_idx, client = int(record["round"]), int(record["client-id"])
            if client == min(malicious):
                return cases[round_idx - 1][1](msg, reply, random.Random(hash((round_idx, client))))
            return [reply]

    job = FedlightJob(config)
    malicious = job.engine.feature("malicious_clients").malicious
    assert len(malicious) == 2
    grid = Grid(apps.build_client_app(str(config)), 4, {})
    state = apps.run_server(grid, job, tmp_path / "out", 60, 5)
    rows = yaml.safe_load((tmp_path / "out" / "rounds.json").read_text())
    log = capsys.readouterr().out
    assert grid.sent.count("query.secagg_mask") == 2 * rounds  # both attackers asked every round
    assert [(r["num_clients"], r["failed"], r["rejected"]) for r in rows] == [(3, 1, 0)] * rounds
    reasons = [line.split("secagg_mask: ", 1)[1] for line in log.splitlines() if "secure aggregation secagg_mask" in line]
    assert len(reasons) == rounds  # why, each time
    assert job.engine.round.failed == {min(malicious): "secure aggregation: its node did not mask the crafted update (see the log)"}
    assert all(torch.isfinite(v).all() for v in state.values())
    with capsys.disabled():
        print(f"\nmask step cases {[c for c, _ in cases]}: {reasons}")


#: (step, tamper): a hostile answer to one SecAgg step, seeded; each leaves that client out of the step
SECAGG_CASES = [
    ("query.secagg_keys", _secagg_edit(lambda v, g: v.__setitem__("keys", [k[: g.randrange(32)] for k in v["keys"]]))),
    ("query.secagg_keys", _secagg_edit(lambda v, g: v.__setitem__("keys", v["keys"][:1]))),
    ("query.secagg_shares", _secagg_edit(lambda v, g: v.__setitem__("to", [t + 100 for t in v["to"]]))),
    ("query.secagg_shares", _secagg_edit(lambda v, g: v.__setitem__("bundles", v["bundles"][:-1]))),
]  # fmt: skip


def test_secure_aggregation_steps_are_screened(tmp_path, capsys, flower_message_env):
    """Hostile answers to the SecAgg steps never crash the round or reveal a wrong sum: a client whose key or
    share answer is unusable is left out of U1 (it cannot mask: `failed`); a reveal with both shares of one
    client, or too few reveals, unmasks nothing (every survivor rejected, the global model unchanged)."""
    from fedlight_flower import apps
    from fedlight_flower.job import FedlightJob

    rng = random.Random(31)
    setup_cases = rng.sample(SECAGG_CASES, k=2)
    cfg = flower_config(
        tmp_path,
        data={"num_clients": 4},
        federation={
            "rounds": 4, "clients_per_round": 4, "local_steps": 1, "eval_before_training": False,
            "secure_aggregation": {"class_path": "fedlight.privacy.secure_round.SecureAggregation"},
            "aggregator": {"class_path": "fedavg", "init_args": {"weighting": "uniform"}},
        },
    )  # fmt: skip
    config = write(cfg, tmp_path / "flower.yaml")

    def both_shares(values, g):  # reveal s_u as well as b_u for a survivor: would unmask its input
        values["s-ids"], values["s-shares"] = values["b-ids"][:1], values["b-shares"][:1]

    class Grid(InMemoryGrid):
        def deliver(self, msg, reply):
            kind = msg.metadata.message_type
            if not kind.startswith("query.secagg"):
                return [reply]
            record = msg.content.config_records["fedlight.secagg"]
            round_idx, client = int(record["round"]), int(record["client-id"])
            g = random.Random(hash((round_idx, client)))
            if round_idx <= 2 and client == 0 and kind == setup_cases[round_idx - 1][0]:
                return setup_cases[round_idx - 1][1](msg, reply, g)
            if round_idx == 3 and client == 0 and kind == "query.secagg_unmask":  # one bad reveal of four: t = 2
                return _secagg_edit(both_shares)(msg, reply, g)
            if round_idx == 4 and client != 3 and kind == "query.secagg_unmask":  # one usable reveal < t
                return [] if client == 1 else _secagg_edit(both_shares)(msg, reply, g)
            return [reply]

    state = apps.run_server(Grid(apps.build_client_app(str(config)), 4, {}), FedlightJob(config), tmp_path / "out", 60, 5)
    rows = yaml.safe_load((tmp_path / "out" / "rounds.json").read_text())
    log = capsys.readouterr().out
    assert [(r["num_clients"], r["failed"], r["rejected"]) for r in rows] == [(3, 1, 0), (3, 1, 0), (4, 0, 0), (0, 0, 4)]
    assert "not in this round's share-holding set U1" in log and "revealed both shares" in log and "not unmasked" in log
    assert all(torch.isfinite(v).all() for v in state.values())


def test_map_clients_ignores_bad_identifications(flower_message_env):
    """A node answering `query` with garbage is left out by name; the run stops before round 1 with a message."""
    from fedlight_flower import apps

    class Grid:
        def get_node_ids(self):
            return [1, 2, 3]

        def send_and_receive(self, messages, *, timeout=None):
            claims = {1: 0, 2: "1", 3: 7}  # node 2: a string id, node 3: out of range
            return [
                Message(RecordDict({"fedlight.info": ConfigRecord({"client-id": claims[m.metadata.dst_node_id]})}), reply_to=m)
                for m in messages
            ]  # fmt: skip

    with pytest.raises(RuntimeError, match=r"no SuperNode holds fedlight clients \[1, 2\].*node 2: client-id '1'"):
        apps.map_clients(Grid(), 3, timeout=1)


#: (federation / model / trainer overrides, what the refusal must say): what needs Lightning's step loop
REFUSED = [
    ({"trainer": {"precision": "bf16-mixed"}}, "precision plugin"),
    ({"optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}, "lr_scheduler": {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1}}}, "stepped by Lightning's loop"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "reason"), REFUSED, ids=[r for _, r in REFUSED])
def test_refused_options_fail_before_training_with_the_reason(tmp_path, overrides, reason):
    from fedlight_flower.job import FedlightJob

    cfg = flower_config(tmp_path, **overrides)
    with pytest.raises(ConfigError, match=f"cannot run on fedlight-flower: .*{reason}"):
        FedlightJob(write(cfg, tmp_path / "bad.yaml"))


def _rows_match(rows: list[dict], history: list[dict], val_atol: float = 1e-6, loss_rtol: float = 0.0) -> None:
    """Every rounds.csv value of `fedlight fit` (but wall time) in the Flower rows: counts, bytes, losses and
    feature metrics exactly; validation metrics to ``val_atol`` (Lightning's loop vs module.evaluate);
    ``loss_rtol`` > 0 where the trained state itself only matches to a tolerance (a rebuilt merged base)."""
    assert [r["round"] for r in rows] == [r["round"] for r in history]
    for ours, theirs in zip(rows, history):
        for key, value in theirs.items():
            if key == "round_time_s":
                continue
            assert key in ours, (ours["round"], key)
            if key.startswith("val_"):
                assert ours[key] == pytest.approx(value, rel=val_atol, abs=val_atol), (ours["round"], key)
            elif loss_rtol and key == "train_loss":
                assert ours[key] == pytest.approx(value, rel=loss_rtol), (ours["round"], key, ours[key], value)
            else:
                assert ours[key] == value, (ours["round"], key, ours[key], value)


def flower_and_fit(tmp_path: Path, cfg: dict, num_clients: int, grid_class=None):
    """The same config through `fedlight fit` and through the ServerApp/ClientApp protocol (InMemoryGrid)."""
    from fedlight_flower import apps
    from fedlight_flower.job import FedlightJob

    fit = round_callback(run_fit(cfg, tmp_path / "inproc"))
    config = write(cfg, tmp_path / "flower.yaml")
    grid = (grid_class or InMemoryGrid)(apps.build_client_app(str(config)), num_clients, {})
    job = FedlightJob(config)
    got = apps.run_server(grid, job, tmp_path / "out", round_timeout=60, nodes_timeout=5)
    rows = yaml.safe_load((tmp_path / "out" / "rounds.json").read_text())
    return fit, job, got, rows, grid


SGD = {"optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}}}
LORA_FED = {"rounds": 3, "clients_per_round": 3, "local_steps": 2, "checkpoint_every": 0}
LORA_LOCAL = {"class_path": "lora", "init_args": {"r": 2, "head": "local"}}  # local head: per-client state

#: id -> (config overrides, tolerance on the trainable state: 0 = bit-identical)
FEATURES = {
    "fedprox": ({"federation": {"client_method": {"class_path": "fedprox", "init_args": {"mu": 0.5}}}}, 0),
    "scaffold+int8-error-feedback": (
        {**SGD, "federation": {"client_method": "scaffold", "uplink_codec": {"class_path": "int8", "init_args": {"error_feedback": True}}}},
        0,
    ),
    "label_flip+median": ({"federation": {"attack": "label_flip", "malicious_fraction": 0.5, "aggregator": "median"}}, 0),
    "sign_flip+fedavg": ({"federation": {"attack": {"class_path": "sign_flip", "init_args": {"scale": 2.0}}, "malicious_fraction": 0.5}}, 0),
    "scaling+max_norm_over_median": (
        {"federation": {"attack": {"class_path": "scaling", "init_args": {"factor": 1e4}}, "malicious_fraction": 0.25, "max_norm_over_median": 50.0}},
        0,
    ),
    # colluding attackers: the malicious clients send their trained tensors; the server's attack feature
    # crafts the updates jointly and runs their client pipeline (int8 error feedback: residuals on the server)
    "alie+median (colluding)": ({"federation": {"attack": "alie", "malicious_fraction": 0.5, "aggregator": "median"}}, 0),
    "gaussian_noise+int8-error-feedback (colluding)": (
        {"federation": {"attack": {"class_path": "gaussian_noise", "init_args": {"std": 0.1}}, "malicious_fraction": 0.5, "uplink_codec": {"class_path": "int8", "init_args": {"error_feedback": True}}}},
        0,
    ),
    # the clients evaluate their own personalised model (local head from Context.state) on their share
    "personal_eval (clients evaluate)": ({"federation": {"personal_eval_every": 1}}, 0),
    # DP-SGD: clients run private_step (the server's seeds); the server's accountant is charged from its own
    # plan. (σ from target_epsilon is the same bind_run on both sides; its search costs ~13 s per bind here.)
    "dp_sgd + fedprox": (
        {"federation": {"privacy": {"class_path": "dp_sgd", "init_args": {"noise_multiplier": 0.8, "max_grad_norm": 1.0}}, "client_method": {"class_path": "fedprox", "init_args": {"mu": 0.5}}}},
        0,
    ),
    # secure aggregation over real messages (keys, shares, masked upload, unmasking of clients lost after
    # training): each client's party lives in its Context.state; the server only ever unmasks the sum
    "secure_aggregation+dropouts": (
        {"federation": {"secure_aggregation": {"class_path": "fedlight.privacy.secure_round.SecureAggregation"}, "aggregator": {"class_path": "fedavg", "init_args": {"weighting": "uniform"}}, "faults": {"dropout_after": 0.3}}},
        0,
    ),
    # an attack under secure aggregation: the server's attack feature crafts the malicious updates (jointly,
    # for alie) and sends each back to its attacker's node, which masks it with its own party (secagg_mask)
    "sign_flip+secure_aggregation+dropouts": (
        {"federation": {"attack": "sign_flip", "malicious_fraction": 0.5, "secure_aggregation": {"class_path": "fedlight.privacy.secure_round.SecureAggregation"}, "aggregator": {"class_path": "fedavg", "init_args": {"weighting": "uniform"}}, "faults": {"dropout_after": 0.3}}},
        0,
    ),
    "alie+secure_aggregation (colluding)": (
        {"federation": {"attack": "alie", "malicious_fraction": 0.5, "secure_aggregation": {"class_path": "fedlight.privacy.secure_round.SecureAggregation"}, "aggregator": {"class_path": "fedavg", "init_args": {"weighting": "uniform"}}}},
        0,
    ),
    "update_norms feature": ({"federation": {"features": [{"class_path": "update_norms"}]}}, 0),
    "fedex_lora (base merging)": ({"model": {"peft": {"class_path": "lora", "init_args": {"r": 2}}}, "federation": {**LORA_FED, "aggregator": "fedex_lora"}}, 1e-6),
    "flora (base merging)": ({"model": {"peft": {"class_path": "lora", "init_args": {"r": 2}}}, "federation": {**LORA_FED, "aggregator": "flora"}}, 1e-6),
    # personalised evaluation on a merged base: the evaluate message carries the base as of this round
    # (evaluation_broadcast), so a client evaluates on the base fedlight fit's shared model has then
    "fedex_lora (base merging) + personal_eval": ({"model": {"peft": LORA_LOCAL}, "federation": {**LORA_FED, "aggregator": "fedex_lora", "personal_eval_every": 1}}, 1e-6),
    "flora (base merging) + personal_eval": ({"model": {"peft": LORA_LOCAL}, "federation": {**LORA_FED, "aggregator": "flora", "personal_eval_every": 1}}, 1e-6),
}  # fmt: skip


@pytest.mark.parametrize("case", list(FEATURES))
def test_round_feature_on_flower_equals_fedlight_fit(tmp_path, capsys, flower_message_env, case):
    """Each engine feature through the ServerApp/ClientApp protocol == `fedlight fit`: the trainable state
    (bit-identical, or to the stated tolerance where remote clients rebuild a merged base from its
    broadcast total), every rounds.csv value, and the server-side state of the features."""
    overrides, atol = FEATURES[case]
    cfg = flower_config(tmp_path, data={"num_clients": 4}, **overrides)
    cfg["federation"]["clients_per_round"] = 3  # >= 3 updates: the median guard is active
    fit, job, got, rows, grid = flower_and_fit(tmp_path, cfg, 4)
    assert list(got) == list(fit.global_state)
    worst = max(float((got[k].float() - v.float()).abs().max()) for k, v in fit.global_state.items())
    assert worst <= atol, (case, worst)
    _rows_match(rows, fit.history, val_atol=1e-6 if atol == 0 else 1e-4, loss_rtol=0.0 if atol == 0 else 1e-5)
    engine = job.engine
    if "scaffold" in case:  # the server control moved as in-process; client controls live in Flower's node state
        server_c, fit_c = engine.feature("client_method").state_dict()["control"], fit.engine.feature("client_method").state_dict()["control"]
        assert all(torch.equal(server_c[k], fit_c[k]) for k in fit_c)
        for client, state in fit.client_store.items():
            record = grid.contexts[1000 + client].state.array_records["fedlight.state.control"]
            assert all(torch.equal(record.to_torch_state_dict()[k], v.float()) for k, v in state["control"].items())
    if "attack" in str(overrides) or "flip" in case or "scaling" in case:
        assert engine.feature("malicious_clients").malicious == fit.malicious and fit.malicious
    if "colluding" in case:  # some round has >= 2 attackers whose updates arrive: they really craft jointly
        plans = [fit.engine.plan_for(r) for r in range(1, fit.engine.schedule.rounds + 1)]
        assert max(len((set(p.training) - set(p.lost)) & fit.malicious) for p in plans) >= 2
        for c in fit.malicious & set(fit.client_store):  # their pipeline state (residuals) is the server's
            theirs, ours = fit.client_store[c].get("residual", {}), engine.client_store[c].get("residual", {})
            assert theirs.keys() == ours.keys() and all(torch.equal(ours[k], v) for k, v in theirs.items())
            assert theirs or "error-feedback" not in case
    if "secure" in case:  # the steps were messages, a lost client was unmasked, no party on the server
        from fedlight_flower.secure import FlowerSecureRound

        assert {"query.secagg_keys", "query.secagg_shares", "query.secagg_unmask"} <= set(grid.sent)
        plans = [fit.engine.plan_for(r) for r in range(1, fit.engine.schedule.rounds + 1)]
        assert (any(p.lost for p in plans) or "dropouts" not in case) and rows[-1]["uplink_bytes"] > 0
        assert isinstance(engine.client.session.current(), FlowerSecureRound)
        assert all("fedlight.secagg" in c.state.config_records for c in grid.contexts.values())
        crafted = sum(len((set(p.training) - set(p.lost)) & fit.malicious) for p in plans)
        assert grid.sent.count("query.secagg_mask") == crafted  # each crafted update masked on its attacker's node
        assert crafted > 0 or "attack" not in str(overrides)
        # a node masks one input per round, and only after holding its own update back: a server asking an
        # honest client (or an attacker a second time) to mask a vector of its choice would learn the input
        from fedlight_flower import apps
        from fedlight_flower.secure import DELTA_RECORD, HELD_KEY, RECORD, client_mask

        client_job, last = apps.get_job(str(tmp_path / "flower.yaml")), plans[-1]
        zeros = apps.state_to_record({k: torch.zeros_like(v) for k, v in fit.global_state.items()})
        for c in sorted(set(last.training) - set(last.lost)):  # each masked once in the last round
            context = grid.contexts[1000 + c]
            config = ConfigRecord({"round": fit.engine.schedule.rounds, "client-id": c, "u1": list(last.training)})
            request = RecordDict({RECORD: config, DELTA_RECORD: zeros})
            with pytest.raises(RuntimeError, match="did not hold its update back"):
                client_mask(client_job, request, context, c)
            context.state[HELD_KEY] = ConfigRecord({"round": fit.engine.schedule.rounds, "client-id": c})  # forged
            with pytest.raises(RuntimeError, match="already masked an input this round"):
                client_mask(client_job, request, context, c)
    if "personal_eval" in case:  # every round's personal statistics, exactly (accuracies are count ratios)
        keys = [k for k in fit.history[-1] if "personal" in k]
        assert len(keys) == 4 and all(r[k] == h[k] for r, h in zip(rows, fit.history) for k in keys if k in h)
        assert sorted(engine.client_store) == sorted(fit.client_store)  # the clients asked: those with state
        assert "evaluate" in grid.sent and all(r["client_evaluate_downlink_bytes"] > 0 for r in rows if r["round"])
    if "dp_sgd" in case:  # the same ε per client and the same accountants, from the server's plan
        assert engine.privacy.client_epsilons() == fit.engine.privacy.client_epsilons() and rows[-1]["epsilon"] > 0
        assert engine.privacy.state_dict() == fit.engine.privacy.state_dict()
    if "scaling" in case:
        assert sum(r.get("rejected", 0) for r in rows) > 0  # the median guard fired on Flower as in-process
    if "base merging" in case:
        merged = engine.frozen_changes()
        assert merged and set(merged) == set(fit.base_total)
        assert all(torch.equal(merged[k], fit.base_total[k]) for k in merged) or atol > 0
        params = dict(job.module.model.named_parameters())
        fit_params = dict(fit.engine.module.model.named_parameters())
        assert max(float((params[k] - fit_params[k]).abs().max()) for k in merged) <= atol
    if "base merging" in case and "personal_eval" in case:
        # the clients' process evaluated last: its base holds the last round's merge too (it trained on
        # the base before that merge, which is further off than the tolerance)
        from fedlight_flower import apps

        client_job = apps.get_job(str(tmp_path / "flower.yaml"))
        client_params = dict(client_job.module.model.named_parameters())
        assert max(float((client_params[k] - fit_params[k]).abs().max()) for k in merged) <= atol
        lag = client_job.engine.feature("base_total")._applied  # what it applied == the server's total
        assert max(float((lag[k] - merged[k]).abs().max()) for k in merged) == 0.0
    with capsys.disabled():
        print(f"\n{case}: max |flower - fit| = {worst:.3g}")


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    found = {}
    for path in sorted(directory.rglob("*.safetensors")):
        found.update({f"{path.relative_to(directory)}:{k}": v for k, v in load_file(str(path)).items()})
    return found


class ForgetfulGrid(InMemoryGrid):
    """An InMemoryGrid whose nodes lose their Context.state before round ``forget`` (what a new Flower run is)."""

    forget = 2

    def send_and_receive(self, messages, *, timeout=None):
        if any(m.metadata.message_type == "train" and m.metadata.group_id == str(self.forget) for m in messages):
            for context in self.contexts.values():
                context.state = RecordDict()
        return super().send_and_receive(messages, timeout=timeout)


@pytest.mark.parametrize("client_state", [False, True], ids=["stateless-clients", "local-head+error-feedback"])
def test_round_checkpoint_resume_and_export_on_flower(tmp_path, capsys, flower_message_env, client_state):
    """Round checkpoints every round (pickle-free, atomic) and an adapter export after the last one. Resumed
    from round 1 in a new run: without client-side state the run continues bit-identically (state, rows,
    export; the export equals `fedlight fit`'s); with it, the clients' store starts empty, which the server
    says, and the result is exactly that of a run whose nodes forgot their state after round 1."""
    from fedlight_flower import apps
    from fedlight_flower.job import FedlightJob

    federation = {"rounds": 3, "clients_per_round": 2, "local_steps": 2, "checkpoint_every": 1, "export_every": 3}
    if client_state:
        federation["uplink_codec"] = {"class_path": "int8", "init_args": {"error_feedback": True}}
        cfg = flower_config(tmp_path, federation=federation)
    else:
        cfg = flower_config(tmp_path, model={"peft": {"class_path": "lora", "init_args": {"r": 2, "head": "shared"}}}, federation=federation)
    config = write(cfg, tmp_path / "flower.yaml")
    client_app = apps.build_client_app(str(config))

    def run(out, grid_class=InMemoryGrid, resume=None):
        state = apps.run_server(grid_class(client_app, 3, {}), FedlightJob(config, resume=resume), tmp_path / out, 60, 5)
        rows = yaml.safe_load((tmp_path / out / "rounds.json").read_text())
        return state, [{k: v for k, v in r.items() if k != "round_time_s"} for r in rows]

    full, full_rows = run("full")
    ckpt = tmp_path / "full" / "checkpoints" / "round-0001.ckpt"
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["last.ckpt", "round-0001.ckpt", "round-0002.ckpt", "round-0003.ckpt"]
    saved = torch.load(ckpt, weights_only=True)  # tensors and plain values only
    assert saved["round"] == 1 and [r["round"] for r in saved["engine"]["history"]] == [0, 1]
    capsys.readouterr()
    resumed, resumed_rows = run("resumed", resume=ckpt)
    log = capsys.readouterr().out
    assert "resuming after round 1" in log
    assert [r["round"] for r in resumed_rows] == [0, 1, 2, 3]
    if not client_state:
        assert "client-side state" not in log
        assert all(torch.equal(resumed[k], full[k]) for k in full)
        assert resumed_rows == full_rows
        exported = _tensors(tmp_path / "resumed" / "adapters" / "round-0003")
        assert exported and exported.keys() == _tensors(tmp_path / "full" / "adapters" / "round-0003").keys()
        run_fit(cfg, tmp_path / "inproc")
        (fit_export,) = list((tmp_path / "runs").rglob("adapters/round-0003"))  # the config's log dir
        fit_tensors = _tensors(fit_export)
        assert fit_tensors.keys() == exported.keys() and all(torch.equal(fit_tensors[k], exported[k]) for k in exported)
    else:
        assert "client-side state (local tensors, error-feedback residuals)" in log
        forgot, forgot_rows = run("forgot", ForgetfulGrid)
        assert all(torch.equal(resumed[k], forgot[k]) for k in forgot)
        assert resumed_rows[2:] == forgot_rows[2:]
        assert not all(torch.equal(resumed[k], full[k]) for k in full)  # the lost client state mattered
    bad = tmp_path / "bad.ckpt"
    torch.save({"round": 1}, bad)
    with pytest.raises(ConfigError, match="not a fedlight-flower round checkpoint"):
        FedlightJob(config, resume=bad)


def test_quiet_offline_environment():
    import fedlight_flower

    env = fedlight_flower.apply_quiet_env({"FLWR_TELEMETRY_ENABLED": "1"})
    assert env["FLWR_TELEMETRY_ENABLED"] == "1"  # an explicit user value wins
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"  # set on import


def test_fedlight_plugins_lists_the_package(monkeypatch, capsys):
    from fedlight.cli import main, print_plugin_packages

    monkeypatch.delenv("FEDLIGHT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    print_plugin_packages()
    assert "fedlight-flower" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # the engine switch: `fedlight flower ...` is fedlight-flower
        main(["flower", "--help"])
    assert exit_info.value.code == 0
    assert "fedlight-flower simulate --config" in capsys.readouterr().out


def _verify(tls, host: str) -> None:
    """Path validation as a TLS client does it (cryptography's verifier: chain to the CA, SAN, validity, usage)."""
    import ipaddress

    from cryptography import x509
    from cryptography.x509.verification import PolicyBuilder, Store

    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    leaf = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    try:
        subject = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        subject = x509.DNSName(host)
    PolicyBuilder().store(Store([ca])).build_server_verifier(subject).verify(leaf, [])


def test_deploy_writes_a_tls_flower_app(tmp_path):
    """TLS is the default: a CA, a SuperLink certificate valid for the given host (and 127.0.0.1/localhost)
    that chains to it, one SuperNode key pair per client, and commands/connection that use them."""
    import stat

    import tomllib
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_ssh_private_key
    from cryptography.x509.verification import VerificationError
    from fedlight_flower.cli import deploy, main
    from fedlight_flower.tls import existing_tls

    config = write(flower_config(tmp_path), tmp_path / "job.yaml")
    app = deploy(config, tmp_path / "app", superlink="10.0.0.5", port=9000)
    project = tomllib.loads((app / "pyproject.toml").read_text())
    assert project["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "fedlight_flower.apps:server_app",
        "clientapp": "fedlight_flower.apps:client_app",
    }
    assert project["tool"]["flwr"]["app"]["config"]["config"] == str(config.resolve())
    tls = existing_tls(app / "tls", ["10.0.0.5"], 3)
    assert tls is not None
    for host in ("10.0.0.5", "127.0.0.1", "localhost"):
        _verify(tls, host)
    for host in ("10.0.0.6", "superlink.example.org"):
        with pytest.raises(VerificationError):
            _verify(tls, host)
    assert not (app / "tls" / "ca.key").exists()  # nobody can mint another certificate this deployment trusts
    for k in range(3):
        key = load_ssh_private_key(tls.node_keys[k].read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        public = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
        assert tls.node_public_key(k).read_bytes().strip() == public
    for secret in (tls.server_key, *tls.node_keys):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    readme = (app / "README.md").read_text()
    d = app / "tls"
    assert (
        f"flower-superlink --ssl-ca-certfile {d}/ca.crt --ssl-certfile {d}/server.pem --ssl-keyfile {d}/server.key "
        "--enable-supernode-auth --disable-runtime-dependency-installation --host 0.0.0.0 --port 9000"
    ) in readme
    assert f'flwr supernode register "{d}/supernode-$K.pub" fedlight-local' in readme
    assert (
        f'flower-supernode --root-certificates {d}/ca.crt --auth-supernode-private-key "{d}/supernode-$K.key" '
        '--superlink 10.0.0.5:9000 --host 127.0.0.1 --port 9094 --node-config "partition-id=$K num-partitions=3"'
    ) in readme
    assert "--insecure" not in readme
    connection = tomllib.loads((app / "flwr-home" / "config.toml").read_text())
    assert connection["superlink"]["fedlight-local"] == {"address": "10.0.0.5:9000", "root-certificates": str(d / "ca.crt")}
    # re-running deploy keeps the material (a running deployment keeps working); another host gets a new CA
    ca = tls.ca_cert.read_bytes()
    deploy(config, tmp_path / "app", superlink="10.0.0.5", port=9000)
    assert tls.ca_cert.read_bytes() == ca
    deploy(config, tmp_path / "app", superlink="superlink.example.org", port=9000)
    assert tls.ca_cert.read_bytes() != ca
    _verify(existing_tls(app / "tls", ["superlink.example.org"], 3), "superlink.example.org")
    assert main(["deploy", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "x")]) == 2


def test_deploy_insecure_only_when_asked(tmp_path):
    import tomllib
    from fedlight_flower.cli import main

    config = write(flower_config(tmp_path), tmp_path / "job.yaml")
    assert main(["deploy", "--config", str(config), "--out", str(tmp_path / "app"), "--insecure", "--port", "9000"]) == 0
    readme = (tmp_path / "app" / "README.md").read_text()
    assert "flower-superlink --insecure --disable-runtime-dependency-installation --host 0.0.0.0 --port 9000" in readme
    assert "Security: NONE" in readme and "register" not in readme and not (tmp_path / "app" / "tls").exists()
    connection = tomllib.loads((tmp_path / "app" / "flwr-home" / "config.toml").read_text())
    assert connection["superlink"]["fedlight-local"] == {"address": "127.0.0.1:9000", "insecure": True}


def _tls_superlink(tmp_path, nodes: int = 2):
    """A SuperLink on 127.0.0.1 with freshly made TLS material and SuperNode authentication (a LocalDeployment)."""
    from fedlight_flower.cli import superlink_commands
    from fedlight_flower.local import LocalDeployment, wait_for_port
    from fedlight_flower.tls import make_tls

    tls = make_tls(tmp_path / "tls", ["127.0.0.1"], nodes)
    deployment = LocalDeployment(tmp_path, nodes, tmp_path / "logs", grace=3, tls=tls)
    deployment.workdir.mkdir(parents=True)
    deployment.flwr_home.mkdir()
    commands = superlink_commands("127.0.0.1", nodes, deployment.port, bind="127.0.0.1", tls=tls)
    return deployment, commands, tls, wait_for_port


def test_tls_superlink_handshake(tmp_path):
    """A real SuperLink with the generated certificates: a TLS handshake that checks the CA and the SAN
    127.0.0.1 succeeds; one trusting only the system CAs fails; a clear-text request gets no HTTP answer."""
    import socket
    import ssl

    deployment, commands, tls, wait_for_port = _tls_superlink(tmp_path)
    host, port = "127.0.0.1", deployment.port
    try:
        link = deployment._spawn(commands["superlink"], "superlink.log")
        wait_for_port(host, port, 60, link)
        context = ssl.create_default_context(cafile=str(tls.ca_cert))  # verifies chain and host name
        with socket.create_connection((host, port), timeout=10) as raw, context.wrap_socket(raw, server_hostname=host) as s:
            assert s.version() in ("TLSv1.2", "TLSv1.3")
            assert ("IP Address", "127.0.0.1") in s.getpeercert()["subjectAltName"]
        raw = socket.create_connection((host, port), timeout=10)
        with pytest.raises(ssl.SSLCertVerificationError):  # the system CAs do not vouch for it
            ssl.create_default_context().wrap_socket(raw, server_hostname=host)
        raw.close()
        with socket.create_connection((host, port), timeout=10) as raw:  # clear text gets no HTTP answer
            raw.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            try:
                answer = raw.recv(64)
            except OSError:
                answer = b""
            assert not answer.startswith(b"HTTP/")
    finally:
        deployment.close()


@pytest.mark.slow
def test_supernode_authentication(tmp_path):
    """SuperNode authentication on a real TLS SuperLink: a SuperNode whose key was registered with
    `flwr supernode register` activates; one with an unregistered key is refused."""
    from fedlight_flower.cli import flwr_config_toml

    deployment, commands, tls, wait_for_port = _tls_superlink(tmp_path)
    host, port = "127.0.0.1", deployment.port
    try:
        link = deployment._spawn(commands["superlink"], "superlink.log")
        wait_for_port(host, port, 60, link)
        (deployment.flwr_home / "config.toml").write_text(flwr_config_toml(host, port, root_certificates=tls.ca_cert))
        deployment.register(commands["register"](0), timeout=60)
        good = deployment._spawn(commands["supernode"](0, deployment.node_ports[0]), "supernode-0.log")
        bad_argv = commands["supernode"](1, deployment.node_ports[1])
        bad = deployment._spawn([*bad_argv, "--max-retries", "2"], "supernode-1.log")  # key 1 never registered
        deadline = time.monotonic() + 90
        link_log = tmp_path / "logs" / "superlink.log"
        while time.monotonic() < deadline and ("Activated node_id" not in link_log.read_text() or bad.poll() is None):
            time.sleep(0.5)
        assert "Activated node_id" in link_log.read_text(), deployment.logs()
        assert good.poll() is None, deployment.logs()  # the registered SuperNode is connected and running
        assert bad.poll() not in (None, 0), deployment.logs()
        assert "Failed to activate SuperNode" in (tmp_path / "logs" / "supernode-1.log").read_text()
    finally:
        deployment.close()


def live_members(groups: set[int]) -> list[int]:
    """Processes (not zombies: a container's init may not reap them) whose process group is in ``groups``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) in groups:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_local_deployment_superlink_and_supernodes(tmp_path):
    """A SuperLink and 2 SuperNodes as local processes on 127.0.0.1 with deploy's TLS material and SuperNode
    authentication (keys registered), one round through `flwr run`, then every process group is gone
    within a bounded time."""
    from fedlight_flower.cli import deploy
    from fedlight_flower.local import LocalDeployment
    from fedlight_flower.tls import existing_tls
    from safetensors.torch import load_file

    cfg = flower_config(
        tmp_path, data={"num_clients": 2}, federation={"rounds": 1, "clients_per_round": 1, "eval_before_training": False}
    )
    config = write(cfg, tmp_path / "job.yaml")
    app = deploy(config, tmp_path / "app", results=tmp_path / "results")
    tls = existing_tls(app / "tls", ["127.0.0.1"], 2)
    assert tls is not None
    deployment = LocalDeployment(app, 2, tmp_path / "logs", grace=3, tls=tls)
    deployment.env["OMP_NUM_THREADS"] = "1"  # the same float reductions as in_process_state: bit-identical
    try:
        deployment.start()
        code = deployment.run(timeout=480)  # minutes on a loaded 2-core machine: a process per message
        assert code == 0, deployment.logs()
    finally:
        t0 = time.monotonic()
        deployment.close()
        closed_in = time.monotonic() - t0
    assert closed_in < 15
    groups = {proc.pid for proc in deployment.procs}
    assert all(proc.poll() is not None for proc in deployment.procs)
    assert not live_members(groups), "processes outlived the deployment"
    got = load_file(str(tmp_path / "results" / "global_state.safetensors"))
    expected, _ = in_process_state(cfg, tmp_path / "inproc")
    assert sorted(got) == sorted(expected)  # safetensors files list names sorted
    for name in expected:
        torch.testing.assert_close(got[name].float(), expected[name].float(), rtol=0, atol=1e-6)
    rows = yaml.safe_load((tmp_path / "results" / "rounds.json").read_text())
    assert [r["round"] for r in rows] == [1] and rows[0]["num_clients"] == 1 and rows[0]["rejected"] == 0
    link_log = (tmp_path / "logs" / "superlink.log").read_text()
    assert "Uvicorn running on https://127.0.0.1" in link_log  # HTTPS only
    assert link_log.count("Activated node_id") == 2  # both SuperNodes authenticated with registered keys
