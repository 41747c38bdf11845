"""Aggregator contract (generated from the registry) and exact maths of each aggregator.

Identity property: a plain or robust aggregator given n identical deltas u applies exactly u. A server
optimizer (Reddi et al. 2021) instead sees the pseudo-gradient Δ, which for identical deltas is exactly
u; what it applies is its own step on Δ (for FedAvgM with server_lr=1 on the first step, exactly u; for
the adaptive ones, m/(√v+τ)). So for those the contract is: Δ == u bit for bit, and the step equals that
of a fresh instance given u by a single client. Their per-method maths tests check the steps by hand.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from fedlight.aggregators.fedavg import FedAvg
from fedlight.aggregators.robust import GeometricMedian, Krum, Median, NormBounding, TrimmedMean
from fedlight.aggregators.server_optim import FedAdagrad, FedAdam, FedAvgM, FedYogi, ServerOptimizer
from fedlight.core.update import DecodedUpdate
from fedlight.plugins import build_registry

REGISTRY = build_registry(autoload=False)
ENTRIES = list(REGISTRY.entries["aggregators"].values())


def _updates(vectors, sizes=None):
    sizes = sizes or [10] * len(vectors)
    return [
        DecodedUpdate(i, n, {"w": torch.tensor(v[:-1], dtype=torch.float32), "b": torch.tensor(v[-1])})
        for i, (v, n) in enumerate(zip(vectors, sizes))
    ]


GLOBAL = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(0.5)}
U = [0.5, -0.25, 1.0]


def _plain(value):
    """True when ``value`` is only tensors and plain Python values (what a checkpoint may hold)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (torch.Tensor, bool, int, float, str))


# ------------------------------------------------------------------------------------------------
# Contract: every registered aggregator
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_identical_updates_give_that_update(entry):
    agg = entry.cls(**entry.cls.example_args)
    same = _updates([U] * 5)
    new = agg.aggregate(GLOBAL, same)
    if isinstance(agg, ServerOptimizer):
        pseudo = entry.cls(**entry.cls.example_args).pseudo_gradient(same)
        assert torch.equal(pseudo["w"], torch.tensor(U[:2])) and torch.equal(pseudo["b"], torch.tensor(U[2]))
        single = entry.cls(**entry.cls.example_args).aggregate(GLOBAL, _updates([U]))
        for k in new:
            assert torch.equal(new[k], single[k]), k
    else:
        assert torch.allclose(new["w"], torch.tensor([1.5, 1.75])) and torch.allclose(new["b"], torch.tensor(1.5))


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_client_order_does_not_matter(entry):
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(7, 3, generator=g).tolist()
    sizes = [3, 9, 4, 12, 7, 5, 8]
    agg = entry.cls(**entry.cls.example_args)
    a = agg.aggregate(GLOBAL, _updates(vectors, sizes))
    perm = [3, 0, 6, 2, 5, 1, 4]
    shuffled = _updates([vectors[i] for i in perm], [sizes[i] for i in perm])
    b = entry.cls(**entry.cls.example_args).aggregate(GLOBAL, shuffled)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_state_round_trips_and_resumes_exactly(entry):
    g = torch.Generator().manual_seed(1)
    rounds = [_updates(torch.randn(5, 3, generator=g).tolist(), [4, 8, 2, 6, 5]) for _ in range(3)]
    agg = entry.cls(**entry.cls.example_args)
    state = agg.aggregate(GLOBAL, rounds[0])
    saved = agg.state_dict()
    assert _plain(saved), saved
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    continuing = [agg.aggregate(state, rounds[1])]  # mutating the original must not touch `saved`
    continuing.append(agg.aggregate(continuing[0], rounds[2]))

    fresh = entry.cls(**entry.cls.example_args)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    resumed = [fresh.aggregate(state, rounds[1])]
    resumed.append(fresh.aggregate(resumed[0], rounds[2]))
    for a, b in zip(continuing, resumed):
        for k in a:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_empty_round_is_a_clear_error(entry):
    with pytest.raises(ValueError, match="at least"):
        entry.cls(**entry.cls.example_args).aggregate(GLOBAL, [])


# ------------------------------------------------------------------------------------------------
# Server optimizers (Reddi et al. 2021), by hand
# ------------------------------------------------------------------------------------------------


def test_pseudo_gradient_weighting():
    ups = _updates([[1.0, 0.0, 0.0], [0.0, 1.0, 4.0]], sizes=[1, 3])
    by_examples = FedAvgM(momentum=0.0).pseudo_gradient(ups)
    assert torch.allclose(by_examples["w"], torch.tensor([0.25, 0.75])) and by_examples["b"].item() == 3.0
    uniform = FedAvgM(momentum=0.0, weighting="uniform").pseudo_gradient(ups)
    assert torch.allclose(uniform["w"], torch.tensor([0.5, 0.5])) and uniform["b"].item() == 2.0


def test_fedavgm_without_momentum_is_fedavg_and_first_step_applies_delta():
    g = torch.Generator().manual_seed(2)
    ups = _updates(torch.randn(4, 3, generator=g).tolist(), [3, 1, 4, 1])
    plain, fedavgm = FedAvg().aggregate(GLOBAL, ups), FedAvgM(server_lr=1.0, momentum=0.0).aggregate(GLOBAL, ups)
    assert all(torch.equal(plain[k], fedavgm[k]) for k in plain)
    first = FedAvgM(server_lr=1.0, momentum=0.9).aggregate(GLOBAL, ups)
    assert all(torch.equal(plain[k], first[k]) for k in plain)


def test_fedavgm_two_steps_by_hand():
    opt = FedAvgM(server_lr=0.5, momentum=0.9)
    g1 = opt.aggregate(GLOBAL, _updates([[1.0, 2.0, 0.0]]))  # m = (1, 2)
    assert torch.allclose(g1["w"], torch.tensor([1.5, 3.0]))
    g2 = opt.aggregate(g1, _updates([[-1.0, 0.0, 0.0]]))  # m = 0.9*(1, 2) + (-1, 0) = (-0.1, 1.8)
    assert torch.allclose(g2["w"], torch.tensor([1.5 - 0.05, 3.0 + 0.9]))
    assert opt.state_dict()["step"] == 2


def _adam_like_step(delta, v0, second):
    m = (1 - 0.9) * delta
    v = second(v0, delta * delta)
    return 0.1 * m / (math.sqrt(v) + 1e-2)


@pytest.mark.parametrize(
    ("cls", "kwargs", "second"),
    [
        (FedAdam, {"betas": (0.9, 0.99)}, lambda v, sq: 0.99 * v + 0.01 * sq),
        (FedYogi, {"betas": (0.9, 0.99)}, lambda v, sq: v - 0.01 * sq * math.copysign(1.0, v - sq) if v != sq else v),
        (FedAdagrad, {"beta1": 0.9}, lambda v, sq: v + sq),
    ],
    ids=["fedadam", "fedyogi", "fedadagrad"],
)
def test_adaptive_first_step_by_hand(cls, kwargs, second):
    opt = cls(server_lr=0.1, tau=1e-2, **kwargs)
    new = opt.aggregate(GLOBAL, _updates([U]))
    for got, base, d in zip([*new["w"].tolist(), new["b"].item()], [1.0, 2.0, 0.5], U):
        assert got == pytest.approx(base + _adam_like_step(d, 1e-4, second), rel=1e-6)


def test_fedadam_one_step_literal_and_yogi_differs_from_adam():
    # Δ = 0.5: m = 0.05, v = 0.99e-4 + 0.01 * 0.25 = 0.002599, step = 0.1 * 0.05 / (0.0509804 + 0.01)
    new = FedAdam(server_lr=0.1, betas=(0.9, 0.99), tau=1e-2).aggregate(GLOBAL, _updates([U]))
    assert new["w"][0].item() == pytest.approx(1.0 + 0.0819936, rel=1e-5)
    yogi = FedYogi(server_lr=0.1, betas=(0.9, 0.99), tau=1e-2).aggregate(GLOBAL, _updates([U]))
    # Yogi's v = 1e-4 + 0.0025 (v grows additively while v < Δ²)
    assert yogi["w"][0].item() == pytest.approx(1.0 + 0.1 * 0.05 / (math.sqrt(0.0026) + 0.01), rel=1e-5)


def test_fedyogi_second_step_shrinks_v_when_gradient_is_small():
    opt = FedYogi(server_lr=0.1, betas=(0.9, 0.5), tau=1e-2)
    g1 = opt.aggregate(GLOBAL, _updates([[1.0, 1.0, 1.0]]))
    v1 = 1e-4 + 0.5 * 1.0  # first step: v0 < Δ² so v grows
    assert opt.state_dict()["exp_avg_sq"]["w"][0].item() == pytest.approx(v1, rel=1e-6)
    opt.aggregate(g1, _updates([[0.1, 0.1, 0.1]]))
    v2 = v1 - 0.5 * 0.01 * 1.0  # v1 > Δ²: v shrinks by (1-β2)Δ²
    m2 = 0.9 * 0.1 + 0.1 * 0.1
    state = opt.state_dict()
    assert state["exp_avg_sq"]["w"][0].item() == pytest.approx(v2, rel=1e-6)
    assert state["exp_avg"]["w"][0].item() == pytest.approx(m2, rel=1e-6)


def test_server_optimizer_rejects_changed_tensor_names_and_bad_state():
    opt = FedAdam()
    opt.aggregate(GLOBAL, _updates([U]))
    other = {"x": torch.zeros(3)}
    with pytest.raises(ValueError, match="optimizer state"):
        opt.aggregate(other, [DecodedUpdate(0, 1, {"x": torch.ones(3)})])
    with pytest.raises(ValueError, match="state must have keys"):
        FedAdam().load_state_dict({"step": 1})


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [
        (FedAvgM, {"server_lr": 0.0}, "server_lr"),
        (FedAvgM, {"momentum": 1.0}, "momentum"),
        (FedAvgM, {"weighting": "size"}, "weighting"),
        (FedAdam, {"betas": (0.9, 1.5)}, r"betas\[1\]"),
        (FedYogi, {"betas": (-0.1, 0.9)}, r"betas\[0\]"),
        (FedAdam, {"betas": (0.9,)}, "betas"),
        (FedAdagrad, {"tau": 0.0}, "tau"),
        (FedAdagrad, {"beta1": 1.0}, "beta1"),
        (TrimmedMean, {"num_trim": -1}, "num_trim"),
        (Krum, {"weighting": "x"}, "weighting"),
        (GeometricMedian, {"eps": 0.0}, "eps"),
    ],
)
def test_bad_arguments_name_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


# ------------------------------------------------------------------------------------------------
# Robust aggregators, by hand
# ------------------------------------------------------------------------------------------------


def test_median_and_trimmed_mean_maths():
    ups = _updates([[1.0, 10.0, 0.0], [2.0, 20.0, 0.0], [100.0, -5.0, 0.0]])
    assert torch.equal(Median().aggregate(GLOBAL, ups)["w"], torch.tensor([1.0 + 2.0, 2.0 + 10.0]))
    ups5 = _updates([[v, 0.0, 0.0] for v in (1.0, 2.0, 3.0, 4.0, 1000.0)])
    # beta=0.2 trims one from each side: mean(2, 3, 4) = 3
    assert TrimmedMean(beta=0.2).aggregate(GLOBAL, ups5)["w"][0].item() == pytest.approx(1.0 + 3.0)
    assert TrimmedMean(num_trim=2).aggregate(GLOBAL, ups5)["w"][0].item() == pytest.approx(1.0 + 3.0)
    with pytest.raises(ValueError, match="trimmed_mean needs at least 1"):
        TrimmedMean(beta=0.4).aggregate(GLOBAL, [])
    with pytest.raises(ValueError, match=r"n > 2 \* num_trim"):
        TrimmedMean(num_trim=2).aggregate(GLOBAL, ups5[:4])


def test_krum_picks_an_honest_update_and_refuses_too_few():
    # n=6, f=1: each score sums the 3 smallest squared distances. The centre (client 0) scores
    # 1+1+1 = 3; client 1 scores 1 (to 0) + 2 + 2 = 5; the outlier scores in the hundreds.
    honest = [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]]
    ups = _updates([*honest, [10.0, 10.0, 10.0]])
    assert Krum(num_byzantine=1).select(ups) == [0]
    new = Krum(num_byzantine=1).aggregate(GLOBAL, ups)
    assert torch.equal(new["w"], GLOBAL["w"]) and torch.equal(new["b"], GLOBAL["b"])
    multi = Krum(num_byzantine=1, num_selected=3, weighting="uniform")
    assert 5 not in multi.select(ups)
    assert float(multi.aggregate(GLOBAL, ups)["w"].sub(GLOBAL["w"]).abs().max()) <= 1.0
    with pytest.raises(ValueError, match="n > 2f \\+ 2"):
        Krum(num_byzantine=2).aggregate(GLOBAL, ups)


def test_norm_bounding_clips_then_averages():
    ups = _updates([[3.0, 4.0, 0.0], [0.3, 0.4, 0.0]])  # norms 5 and 0.5
    new = NormBounding(max_norm=1.0).aggregate(GLOBAL, ups)
    # (0.6, 0.8) and (0.3, 0.4) averaged: (0.45, 0.6)
    assert torch.allclose(new["w"], torch.tensor([1.45, 2.6]))
    weighted = NormBounding(max_norm=1.0).aggregate(GLOBAL, _updates([[3.0, 4.0, 0.0], [0.3, 0.4, 0.0]], [1, 3]))
    assert torch.allclose(weighted["w"], torch.tensor([1.0 + 0.25 * 0.6 + 0.75 * 0.3, 2.0 + 0.25 * 0.8 + 0.75 * 0.4]))


def test_geometric_median_of_symmetric_points_and_outlier_resistance():
    square = _updates([[1.0, 1.0, 0.0], [-1.0, 1.0, 0.0], [1.0, -1.0, 0.0], [-1.0, -1.0, 0.0]])
    assert torch.allclose(GeometricMedian().aggregate(GLOBAL, square)["w"], GLOBAL["w"], atol=1e-5)
    ups = _updates([[0.0, 0.0, 0.0]] * 4 + [[1000.0, 1000.0, 0.0]])
    assert float(GeometricMedian().aggregate(GLOBAL, ups)["w"].sub(GLOBAL["w"]).norm()) < 1e-3
    # example weights: a client holding more than half the weight is the weighted geometric median
    heavy = _updates([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]], [1, 1, 5])
    assert float(GeometricMedian().aggregate(GLOBAL, heavy)["w"].sub(GLOBAL["w"]).norm()) < 1e-3
