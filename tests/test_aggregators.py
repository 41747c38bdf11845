"""Aggregator contract (generated from the registry) and exact maths of each aggregator."""

from __future__ import annotations

import pytest
import torch

from fedlight.aggregators.robust import GeometricMedian, Krum, Median, NormBounding, TrimmedMean
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


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_identical_updates_give_that_update(entry):
    agg = entry.cls(**entry.cls.example_args)
    same = _updates([[0.5, -0.25, 1.0]] * 5)
    new = agg.aggregate(GLOBAL, same)
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
def test_state_round_trips(entry):
    agg = entry.cls(**entry.cls.example_args)
    agg.aggregate(GLOBAL, _updates([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    fresh = entry.cls(**entry.cls.example_args)
    fresh.load_state_dict(agg.state_dict())
    assert fresh.state_dict().keys() == agg.state_dict().keys()


def test_median_and_trimmed_mean_maths():
    ups = _updates([[1.0, 10.0, 0.0], [2.0, 20.0, 0.0], [100.0, -5.0, 0.0]])
    assert torch.equal(Median().aggregate(GLOBAL, ups)["w"], torch.tensor([1.0 + 2.0, 2.0 + 10.0]))
    ups5 = _updates([[v, 0.0, 0.0] for v in (1.0, 2.0, 3.0, 4.0, 1000.0)])
    # beta=0.2 trims one from each side: mean(2, 3, 4) = 3
    assert TrimmedMean(beta=0.2).aggregate(GLOBAL, ups5)["w"][0].item() == pytest.approx(1.0 + 3.0)
    with pytest.raises(ValueError, match="trimmed_mean needs at least 1"):
        TrimmedMean(beta=0.4).aggregate(GLOBAL, [])


def test_krum_picks_an_honest_update_and_refuses_too_few():
    honest = [[1.0, 1.0, 1.0], [1.1, 0.9, 1.0], [0.9, 1.1, 1.0], [1.0, 1.05, 0.95], [1.05, 1.0, 1.0]]
    ups = _updates([*honest, [50.0, -50.0, 9.0]])
    chosen = Krum(num_byzantine=1).select(ups)
    assert chosen[0] != 5
    multi = Krum(num_byzantine=1, num_selected=3).aggregate(GLOBAL, ups)
    assert float(multi["w"][0]) < 3.0
    with pytest.raises(ValueError, match="n > 2f \\+ 2"):
        Krum(num_byzantine=2).aggregate(GLOBAL, ups)


def test_norm_bounding_clips_then_averages():
    ups = _updates([[3.0, 4.0, 0.0], [0.3, 0.4, 0.0]])  # norms 5 and 0.5
    new = NormBounding(max_norm=1.0).aggregate(GLOBAL, ups)
    # (0.6, 0.8) and (0.3, 0.4) averaged: (0.45, 0.6)
    assert torch.allclose(new["w"], torch.tensor([1.45, 2.6]))


def test_geometric_median_of_symmetric_points_and_outlier_resistance():
    square = _updates([[1.0, 1.0, 0.0], [-1.0, 1.0, 0.0], [1.0, -1.0, 0.0], [-1.0, -1.0, 0.0]])
    assert torch.allclose(GeometricMedian().aggregate(GLOBAL, square)["w"], GLOBAL["w"], atol=1e-5)
    ups = _updates([[0.0, 0.0, 0.0]] * 4 + [[1000.0, 1000.0, 0.0]])
    assert float(GeometricMedian().aggregate(GLOBAL, ups)["w"].sub(GLOBAL["w"]).norm()) < 1e-3
