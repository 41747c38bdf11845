"""System heterogeneity: seeded client sampling (uniform, weighted by size) and per-client compute tiers."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import yaml

from conftest import round_callback, run_fit, vision_config
from fedlight.core.heterogeneity import ComputeTiers
from fedlight.core.plan import plan_round

SIZES = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]


@pytest.mark.parametrize("sampling", ["uniform", "weighted"])
def test_plan_is_a_function_of_seed_and_round(sampling):
    scale = ComputeTiers([1.0, 0.5]).assign(len(SIZES), seed=3)
    plan = lambda seed, r: plan_round(seed, r, SIZES, 4, 8, 6, None, sampling=sampling, step_scale=scale)  # noqa: E731
    assert plan(3, 5) == plan(3, 5)
    assert len({plan(3, r).clients for r in range(1, 30)}) > 10  # rounds differ
    assert any(plan(4, r).clients != plan(3, r).clients for r in range(1, 10))  # seeds differ
    assert all(len(set(plan(3, r).clients)) == 4 for r in range(1, 30))  # without replacement


def test_uniform_sampling_is_unchanged_by_the_new_options():
    for r in range(1, 20):
        default = plan_round(7, r, SIZES, 3, 8, 5, None)
        rng = np.random.default_rng([7, r])
        assert default.clients == tuple(int(c) for c in np.sort(rng.choice(len(SIZES), 3, replace=False)))
        assert default == plan_round(7, r, SIZES, 3, 8, 5, None, sampling="uniform", step_scale=None)


def test_weighted_sampling_follows_client_sizes():
    rounds = 4000
    counts = Counter(plan_round(0, r, SIZES, 1, 8, 1, None, sampling="weighted").clients[0] for r in range(1, rounds + 1))
    p = np.asarray(SIZES) / sum(SIZES)
    for k, pk in enumerate(p):  # one client per round: frequencies are exactly proportional, within 4 sigma
        sigma = math.sqrt(rounds * pk * (1 - pk))
        assert abs(counts[k] - rounds * pk) < 4 * sigma, (k, counts[k], rounds * pk)
    # several per round (successive draws): larger clients are still sampled more often, uniform is flat
    weighted = Counter(c for r in range(1, 2001) for c in plan_round(1, r, SIZES, 3, 8, 1, None, sampling="weighted").clients)
    uniform = Counter(c for r in range(1, 2001) for c in plan_round(1, r, SIZES, 3, 8, 1, None).clients)
    assert np.corrcoef(SIZES, [weighted[k] for k in range(10)])[0, 1] > 0.95
    assert weighted[9] > 3 * weighted[0]
    assert max(uniform.values()) < 1.25 * min(uniform.values())


def test_weighted_sampling_never_picks_an_empty_client():
    sizes = [0, 5, 0, 7, 9]
    for r in range(1, 50):
        assert 0 not in plan_round(0, r, sizes, 3, 4, 1, None, sampling="weighted").clients
        assert 2 not in plan_round(0, r, sizes, 3, 4, 1, None, sampling="weighted").clients
    with pytest.raises(ValueError, match="non-empty"):
        plan_round(0, 1, sizes, 4, 4, 1, None, sampling="weighted")


def test_compute_tiers_assignment_and_steps():
    tiers = ComputeTiers([1.0, 0.5, 0.1], probs=[0.6, 0.3, 0.1])
    a = tiers.assign(3000, seed=0)
    assert a == tiers.assign(3000, seed=0) and a != tiers.assign(3000, seed=1)
    freq = Counter(a)
    assert abs(freq[1.0] / 3000 - 0.6) < 0.04 and abs(freq[0.5] / 3000 - 0.3) < 0.04
    scale = [1.0, 0.5, 0.1, 0.26]
    plan = plan_round(0, 1, [40] * 4, 4, 8, 10, None, step_scale=scale)
    assert plan.steps == (10, 5, 1, 3)
    # with local_epochs (s_k = ceil(epochs*n_k/B)) and a deadline applied after the tiers
    plan = plan_round(0, 1, [80] * 4, 4, 8, None, 2.0, deadline_steps=12, step_scale=scale)
    assert plan.steps == (12, 10, 2, 6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fractions": []}, "at least one tier"),
        ({"fractions": [1.0, 1.5]}, r"fractions must be in \(0, 1\]"),
        ({"fractions": [1.0, 0.5], "probs": [1.0]}, "has 1 entries for 2 fractions"),
        ({"fractions": [1.0, 0.5], "probs": [0.7, 0.7]}, "sum to 1"),
    ],
)
def test_compute_tiers_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ComputeTiers(**kwargs)


def test_bad_sampling_fails_before_training(tmp_path, capsys):
    from fedlight.cli import main

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(vision_config(tmp_path, federation={"client_sampling": "random"})))
    assert main(["fit", "--config", str(path)]) == 2
    assert "federation.client_sampling must be 'uniform' or 'weighted'" in capsys.readouterr().err
    assert not list(tmp_path.rglob("rounds.csv"))


def test_per_client_steps_are_honoured_in_the_actual_batches(tmp_path, monkeypatch):
    from fedlight.core.round import FederatedRound

    seen: Counter = Counter()
    original = FederatedRound.on_train_batch_start

    def record(self, trainer, pl_module, batch, batch_idx):
        clients = set(batch["client_id"].tolist())
        assert len(clients) == 1  # a batch never spans two clients
        seen[(trainer.current_epoch + 1, clients.pop())] += 1
        return original(self, trainer, pl_module, batch, batch_idx)

    monkeypatch.setattr(FederatedRound, "on_train_batch_start", record)
    federation = {
        "rounds": 2, "clients_per_round": 3, "local_steps": 4, "checkpoint_every": 0, "eval_before_training": False,
        "client_sampling": "weighted", "compute_tiers": {"fractions": [1.0, 0.5, 0.25]},
    }  # fmt: skip
    cfg = vision_config(tmp_path, federation=federation)
    cfg["data"]["num_clients"] = 6
    fed = round_callback(run_fit(cfg, tmp_path))
    scale = ComputeTiers([1.0, 0.5, 0.25]).assign(6, seed=0)
    expected = Counter()
    for r in (1, 2):
        plan = fed.plan_for(r)
        assert plan.steps == tuple(max(1, math.ceil(4 * scale[c])) for c in plan.training)
        expected.update({(r, c): s for c, s in zip(plan.training, plan.steps)})
    assert seen == expected
    assert len({s for (_, _), s in expected.items()}) >= 2, "the seed put every sampled client in one tier"
