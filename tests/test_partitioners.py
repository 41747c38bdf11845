"""Partitioner contract (generated from the registry), the skew each one promises, and the histogram report."""

from __future__ import annotations

import numpy as np
import pytest

from fedlight.partitioners.dirichlet import Dirichlet
from fedlight.partitioners.natural_id import NaturalId
from fedlight.partitioners.quantity_skew import QuantitySkew
from fedlight.partitioners.shards import Shards
from fedlight.plugins import build_registry
from fedlight.report.partitions import format_histograms, label_histograms, plot_histograms, skew_summary

REGISTRY = build_registry(autoload=False)
ENTRIES = list(REGISTRY.entries["partitioners"].values())

_rng = np.random.default_rng(123)
LABELS = _rng.choice(10, size=600, p=np.linspace(1, 2, 10) / np.linspace(1, 2, 10).sum())  # mildly imbalanced
GROUPS = _rng.integers(0, 40, size=600)  # 40 "writers"
_WORDS = ["cat", "dog", "sun", "rain", "code", "bug", "tea", "cake", "ship", "star", "moon", "tree"]
#: seeded unlabelled texts (varied lengths, label-correlated words) for label-free partitioners
EXAMPLES = [
    {"text": " ".join(_rng.choice(_WORDS[y % 6 : y % 6 + 6], size=1 + int(_rng.integers(1, 30)))), "group": str(g)}
    for y, g in zip(LABELS, GROUPS)
]
NUM_CLIENTS = 8


def _split(cls, labels=LABELS, num_clients=NUM_CLIENTS, seed=0, groups=GROUPS, **kwargs):
    """Call a partitioner as the data module does: ``needs_groups`` ones get ``groups``, ``needs_examples`` ones
    also the examples."""
    part = cls(**{**cls.example_args, **kwargs})
    extra = {"groups": groups} if getattr(cls, "needs_groups", False) else {}
    if getattr(cls, "needs_examples", False):
        extra.update(groups=groups, examples=EXAMPLES[: len(labels)])
    return part(labels, num_clients, seed, **extra)


# ------------------------------------------------------------------------------------------------
# Contract: every registered partitioner
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_disjoint_and_covering(entry):
    parts = _split(entry.cls)
    assert len(parts) == NUM_CLIENTS and all(len(p) > 0 for p in parts)
    assert all(p.dtype == np.int64 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) == len(LABELS)  # disjoint and covering
    assert np.array_equal(np.sort(joined), np.arange(len(LABELS)))


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_seeded(entry):
    a, b, c = (_split(entry.cls, seed=s) for s in (7, 7, 8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c))


# ------------------------------------------------------------------------------------------------
# The skew each partitioner promises
# ------------------------------------------------------------------------------------------------


def test_dirichlet_skew_is_measurable():
    # statistic: mean over clients of the total-variation distance between the client's label
    # distribution and the pooled one (0 = IID); averaged over three seeds
    labels = np.random.default_rng(0).integers(0, 10, size=2000)

    def mean_tv(alpha):
        hists = [label_histograms(Dirichlet(alpha=alpha)(labels, 10, s), labels, 10) for s in range(3)]
        tvs = [skew_summary(h)["mean_tv"] for h in hists]
        return float(np.mean(tvs))

    skewed, near_iid = mean_tv(0.1), mean_tv(100.0)
    assert skewed > 0.5, skewed
    assert near_iid < 0.1, near_iid
    assert skewed > 5 * near_iid


@pytest.mark.parametrize(("k", "clients"), [(1, 10), (2, 8), (3, 8), (2, 60)])
def test_shards_give_at_most_k_classes_per_client(k, clients):
    parts = _split(Shards, num_clients=clients, classes_per_client=k)
    hist = label_histograms(parts, LABELS, 10)
    assert ((hist > 0).sum(1) <= k).all()
    assert hist.sum() == len(LABELS)


def test_shards_refuse_too_few_shards_for_the_classes():
    with pytest.raises(ValueError, match="fewer than the 10 classes"):
        Shards(classes_per_client=1)(LABELS, 4, 0)


def test_quantity_skew_sizes_vary_with_sigma():
    cv = {s: skew_summary(label_histograms(_split(QuantitySkew, sigma=s), LABELS, 10))["size_cv"] for s in (0.0, 1.5)}
    assert cv[1.5] > 0.5 and cv[0.0] < 0.02
    sizes = [len(p) for p in _split(QuantitySkew, sigma=0.0)]
    assert max(sizes) - min(sizes) <= 1
    big = [len(p) for p in _split(QuantitySkew, num_clients=50, sigma=3.0, min_size=5)]
    assert min(big) >= 5 and sum(big) == len(LABELS)
    with pytest.raises(ValueError, match="min_size"):
        QuantitySkew(min_size=100)(LABELS, 8, 0)


def test_natural_id_keeps_groups_whole():
    parts = _split(NaturalId, num_clients=40)
    assert sorted(len(np.unique(GROUPS[p])) for p in parts) == [1] * 40  # one writer per client
    parts = _split(NaturalId, num_clients=NUM_CLIENTS)
    owners = {}
    for client, p in enumerate(parts):
        for g in np.unique(GROUPS[p]):
            assert owners.setdefault(int(g), client) == client  # no group split across clients
        assert len(np.unique(GROUPS[p])) == 5  # 40 groups dealt over 8 clients


def test_natural_id_errors_are_clear():
    with pytest.raises(ValueError, match="needs per-example group ids"):
        NaturalId()(LABELS, 8, 0)
    with pytest.raises(ValueError, match="exceeds the 40 distinct group ids"):
        NaturalId()(LABELS, 41, 0, groups=GROUPS)
    with pytest.raises(ValueError, match="group ids for 600"):
        NaturalId()(LABELS, 4, 0, groups=GROUPS[:10])


def test_natural_id_accepts_string_ids():
    writers = np.asarray([f"w{g}" for g in GROUPS], dtype=object)
    parts = NaturalId()(LABELS, 40, 0, groups=writers)
    assert sum(len(p) for p in parts) == len(LABELS)


# ------------------------------------------------------------------------------------------------
# Histogram report
# ------------------------------------------------------------------------------------------------


def test_label_histograms_and_table(tmp_path):
    labels = np.array([0, 0, 1, 2, 2, 2])
    hist = label_histograms([np.array([0, 1, 2]), np.array([3, 4, 5])], labels, 3)
    assert hist.tolist() == [[2, 1, 0], [0, 0, 3]]
    s = skew_summary(hist)
    # pooled = (2, 1, 3)/6; client 0 = (2/3, 1/3, 0): TV = ½(1/3 + 1/6 + 1/2) = 1/2; client 1 likewise 1/2
    assert s["mean_tv"] == pytest.approx(0.5) and s["mean_classes"] == 1.5
    table = format_histograms(hist, label_names=["cat", "dog", "eel"])
    lines = table.splitlines()
    assert lines[0].split() == ["client", "n", "cat", "dog", "eel", "classes", "tv"]
    assert lines[2].split() == ["0", "3", "2", "1", "0", "2", "0.50"]
    assert "mean TV 0.500" in table
    wide = format_histograms(label_histograms(_split(Shards), LABELS, 10), max_columns=4)
    assert "top classes" in wide and len(wide.splitlines()) == NUM_CLIENTS + 4
    png = plot_histograms(hist, tmp_path / "sub" / "hist.png", label_names=["cat", "dog", "eel"])
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="labels must lie"):
        label_histograms([np.array([0])], np.array([5]), 3)
