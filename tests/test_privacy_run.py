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
