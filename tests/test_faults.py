"""Client faults: dropouts, stragglers, crashing clients, too few updates, update norm bound."""

from __future__ import annotations

import types

import pytest
import torch

from conftest import read_rounds, round_callback, run_fit, text_config
from fedlight import plugins
from fedlight.core.faults import TooFewClientsError
from fedlight.core.plan import plan_round
from fedlight.hookspecs import hookimpl
from fedlight.tasks.text_classification import TextClassification


def test_plan_dropouts_are_seeded_and_consistent():
    sizes = [8] * 20
    plans = [plan_round(0, r, sizes, 10, 4, 3, None, dropout_before=0.3, dropout_after=0.3) for r in range(1, 40)]
    assert plans[0] == plan_round(0, 1, sizes, 10, 4, 3, None, dropout_before=0.3, dropout_after=0.3)
    dropped = sum(len(p.dropped_before) for p in plans) / (10 * len(plans))
    assert 0.15 < dropped < 0.45
    for p in plans:
        assert set(p.training) | set(p.dropped_before) == set(p.clients)
        assert set(p.lost) <= set(p.training)
    everyone_drops = plan_round(0, 1, sizes, 3, 4, 2, None, dropout_before=0.999999)
    assert everyone_drops.training == (everyone_drops.clients[0],) and everyone_drops.lost == everyone_drops.training


def test_stragglers_partial_and_drop():
    sizes = [4, 40, 400]
    partial = plan_round(0, 1, sizes, 3, 4, None, 1.0, deadline_steps=5, straggler_policy="partial")
    assert partial.steps == (1, 5, 5) and partial.lost == ()
    drop = plan_round(0, 1, sizes, 3, 4, None, 1.0, deadline_steps=5, straggler_policy="drop")
    assert drop.steps == (1, 10, 100) and drop.lost == (1, 2)


def test_dropouts_in_a_run_are_logged_and_bytes_follow(tiny_bert_dir, tmp_path):
    cfg = text_config(
        tiny_bert_dir, tmp_path,
        federation={"rounds": 3, "clients_per_round": 4, "faults": {"dropout_before": 0.3, "dropout_after": 0.3}},
    )  # fmt: skip
    fed = round_callback(run_fit(cfg, tmp_path))
    from fedlight.codecs.identity import IdentityCodec

    payload = len(IdentityCodec().encode(fed.global_state))
    rows = read_rounds(tmp_path)[1:]
    assert sum(int(r["dropped"]) for r in rows) > 0
    for r in rows:
        assert int(r["num_clients"]) + int(r["dropped"]) == 4
        assert int(r["uplink_bytes"]) == int(r["num_clients"]) * payload


class CrashingTask(TextClassification):
    """A text classifier whose client 1 always raises (to test isolation)."""

    name = "crashing_text_classification"

    def step(self, model, batch):
        if 1 in batch.get("client_id", torch.tensor([])).tolist():
            raise RuntimeError("client 1 is broken")
        return super().step(model, batch)


@pytest.fixture
def crashing_registry():
    module = types.ModuleType("crashing_plugin")
    module.fedlight_tasks = hookimpl(lambda: [CrashingTask])
    plugins.set_registry(plugins.build_registry(autoload=False, extra=[module]))
    yield
    plugins.set_registry(None)


def test_a_client_that_raises_is_isolated(tiny_bert_dir, tmp_path, crashing_registry):
    task = {"class_path": "crashing_text_classification", "init_args": {"model_name_or_path": str(tiny_bert_dir)}}
    cfg = text_config(tiny_bert_dir, tmp_path, model={"task": task}, federation={"clients_per_round": 4, "rounds": 1})
    with pytest.warns(UserWarning, match="client 1 raised"):
        fed = round_callback(run_fit(cfg, tmp_path))
    row = fed.history[-1]
    assert row["failed"] == 1 and row["num_clients"] == 3


def test_too_few_clients_skip_or_stop(tiny_bert_dir, tmp_path):
    faults = {"dropout_after": 0.99, "min_clients": 1, "on_too_few_clients": "skip"}
    cfg = text_config(tiny_bert_dir, tmp_path / "skip", federation={"rounds": 1, "faults": faults})
    cli = run_fit(cfg, tmp_path / "skip")
    fed = round_callback(cli)
    assert fed.history[-1]["num_clients"] == 0
    initial = cli.model.peft.get_state(cli.model.model, cli.model.shared_names)
    assert all(torch.equal(initial[n], fed.global_state[n]) for n in initial)
    cfg = text_config(tiny_bert_dir, tmp_path / "stop", federation={"rounds": 1, "faults": {**faults, "on_too_few_clients": "stop"}})
    with pytest.raises(TooFewClientsError, match="min_clients"):
        run_fit(cfg, tmp_path / "stop")


def test_updates_beyond_the_norm_bound_are_rejected(tiny_bert_dir, tmp_path):
    cfg = text_config(tiny_bert_dir, tmp_path, federation={"rounds": 1, "max_update_norm": 1e-9})
    fed = round_callback(run_fit(cfg, tmp_path))
    assert fed.history[-1]["rejected"] == 2 and fed.history[-1]["num_clients"] == 0
