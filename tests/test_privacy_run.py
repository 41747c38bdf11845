"""DP inside real runs: epsilon logged every round, budget stops training, unsound combinations refused."""

from __future__ import annotations

import pytest

from conftest import read_rounds, round_callback, run_fit, text_config

UNIFORM = {"class_path": "fedavg", "init_args": {"weighting": "uniform"}}


def _dp(**init_args):
    return {"class_path": "dp_fedavg", "init_args": {"noise_multiplier": 1.0, "clip_norm": 0.5, **init_args}}


def test_epsilon_is_logged_every_round_and_grows(tiny_bert_dir, tmp_path):
    cfg = text_config(tiny_bert_dir, tmp_path, federation={"rounds": 3, "privacy": _dp(), "aggregator": UNIFORM})
    fed = round_callback(run_fit(cfg, tmp_path))
    eps = [float(r["epsilon"]) for r in read_rounds(tmp_path)[1:]]
    assert len(eps) == 3 and 0 < eps[0] < eps[1] < eps[2]
    assert fed.privacy.population == 4 and fed.privacy.clients_per_round == 2  # taken from the run


def test_target_epsilon_stops_training_before_it_is_exceeded(tiny_bert_dir, tmp_path):
    from fedlight.privacy.dp_fedavg import DPFedAvg

    probe = DPFedAvg(noise_multiplier=1.0, clip_norm=0.5, population=4, clients_per_round=2)
    for _ in range(2):
        probe.on_round_end()
    budget = probe.epsilon_after(0) * 1.0001  # exactly two rounds fit in the budget
    cfg = text_config(
        tiny_bert_dir, tmp_path, federation={"rounds": 5, "privacy": _dp(target_epsilon=budget), "aggregator": UNIFORM}
    )
    fed = round_callback(run_fit(cfg, tmp_path))
    assert [r["round"] for r in fed.history] == [0, 1, 2]
    assert fed.privacy.epsilon() <= budget


def test_dp_needs_uniform_fedavg(tiny_bert_dir, tmp_path):
    cfg = text_config(tiny_bert_dir, tmp_path, federation={"privacy": _dp()})
    with pytest.raises(ValueError, match="weighting: uniform"):
        run_fit(cfg, tmp_path)


def test_dp_sampling_must_match_the_run(tiny_bert_dir, tmp_path):
    cfg = text_config(tiny_bert_dir, tmp_path, federation={"privacy": _dp(population=100), "aggregator": UNIFORM})
    with pytest.raises(ValueError, match="population=100 disagrees with the run"):
        run_fit(cfg, tmp_path)


def test_nan_and_zero_updates_never_poison_a_dp_round():
    import torch

    from fedlight.aggregators.fedavg import FedAvg
    from fedlight.codecs.identity import IdentityCodec
    from fedlight.core.server import ServerPipeline
    from fedlight.core.update import ClientUpdate
    from fedlight.privacy.dp_fedavg import DPFedAvg

    codec = IdentityCodec()
    dp = DPFedAvg(noise_multiplier=0.5, clip_norm=1.0, population=10, clients_per_round=3)
    server = ServerPipeline(codec, codec, FedAvg(weighting="uniform"), dp)
    glob = {"w": torch.zeros(20), "s": torch.tensor(0.0)}
    deltas = [
        {"w": torch.zeros(20), "s": torch.tensor(0.0)},  # unchanged
        {"w": torch.full((20,), float("nan")), "s": torch.tensor(1.0)},
        {"w": torch.full((20,), float("inf")), "s": torch.tensor(0.0)},
        {"w": torch.full((20,), 3.0), "s": torch.tensor(1.0)},
    ]
    updates = [ClientUpdate(i, 5, codec.encode(d)) for i, d in enumerate(deltas)]
    new, report = server.aggregate(glob, updates, torch.Generator().manual_seed(0))
    assert report.accepted == [0, 3] and set(report.rejected) == {1, 2}
    assert all(torch.isfinite(v).all() for v in new.values())


def test_rounds_whose_updates_are_all_lost_are_still_charged(tiny_bert_dir, tmp_path):
    """Secure aggregation + DP-FedAvg with heavy post-masking dropout: failed rounds still cost ε."""
    from fedlight.privacy.dp_fedavg import DPFedAvg

    fed = {
        "rounds": 3,
        "clients_per_round": 3,
        "privacy": _dp(),
        "aggregator": UNIFORM,
        "secure_aggregation": {"threshold": 0.5},
        "faults": {"dropout_after": 0.7},
    }
    run = round_callback(run_fit(text_config(tiny_bert_dir, tmp_path, federation=fed), tmp_path))
    rows = read_rounds(tmp_path)[1:]
    assert any(int(r["num_clients"]) == 0 for r in rows)  # at least one round revealed nothing
    probe = DPFedAvg(noise_multiplier=1.0, clip_norm=0.5, population=4, clients_per_round=3)
    for _ in range(3):
        probe.on_round_end()
    assert run.privacy.rounds == 3 and float(rows[-1]["epsilon"]) == pytest.approx(probe.epsilon())
