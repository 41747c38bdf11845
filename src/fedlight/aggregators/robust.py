"""Byzantine-robust aggregators: each is a drop-in replacement for FedAvg's weighted mean of deltas.

Weights: ``median``, ``trimmed_mean`` and Krum's *selection* are unweighted (a client cannot buy
influence by claiming many examples); Multi-Krum's average of the selected updates, ``norm_bounding``
and ``geometric_median`` use the ``weighting`` argument (``examples`` by default, or ``uniform``).
Each raises a ValueError naming the requirement when a round has too few updates.
"""

from __future__ import annotations

import math

import torch

from fedlight.aggregators.base import Aggregator, check_weighting, client_weights
from fedlight.core.state import State, add, weighted_sum
from fedlight.core.update import DecodedUpdate
from fedlight.hookspecs import hookimpl


def _flatten(updates: list[DecodedUpdate]) -> torch.Tensor:
    """(clients, parameters) matrix of the deltas in fp64, in the global state's tensor order."""
    return torch.stack([torch.cat([v.double().reshape(-1) for v in u.delta.values()]) for u in updates])


def _unflatten(vector: torch.Tensor, like: State) -> State:
    out, offset = {}, 0
    for name, value in like.items():
        n = value.numel()
        out[name] = vector[offset : offset + n].reshape(value.shape).float()
        offset += n
    return out


def _need(updates: list[DecodedUpdate], minimum: int, who: str, why: str) -> None:
    if len(updates) < minimum:
        raise ValueError(f"{who} needs at least {minimum} updates ({why}), got {len(updates)}")


class Median(Aggregator):
    """Coordinate-wise median of the client deltas (Yin et al. 2018); unweighted by design."""

    name = "median"

    def aggregate(self, global_state: State, updates: list[DecodedUpdate]) -> State:
        _need(updates, 1, "median", "nothing to aggregate")
        stacked = _flatten(updates)
        # mean of the two middle values for an even count, as the statistical median
        median = stacked.quantile(0.5, dim=0) if len(updates) > 1 else stacked[0]
        return add(global_state, _unflatten(median, updates[0].delta))


class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean (Yin et al. 2018): drop the beta fraction largest and smallest values.

    Per coordinate, ``floor(beta * n)`` values are dropped from each end (so ``beta < 0.5`` always
    leaves one); ``num_trim`` instead fixes that count (e.g. the assumed number of attackers), and
    then ``n > 2 * num_trim`` updates are required.
    """

    name = "trimmed_mean"
    example_args = {"beta": 0.1}

    def __init__(self, beta: float = 0.1, num_trim: int | None = None) -> None:
        if not 0.0 <= beta < 0.5:
            raise ValueError(f"trimmed_mean beta must be in [0, 0.5), got {beta}")
        if num_trim is not None and num_trim < 0:
            raise ValueError(f"trimmed_mean num_trim must be >= 0 or null, got {num_trim}")
        self.beta = beta
        self.num_trim = num_trim

    def trim_count(self, n: int) -> int:
        return math.floor(self.beta * n) if self.num_trim is None else self.num_trim

    def aggregate(self, global_state: State, updates: list[DecodedUpdate]) -> State:
        _need(updates, 1, "trimmed_mean", "nothing to aggregate")
        k = self.trim_count(len(updates))
        _need(updates, 2 * k + 1, "trimmed_mean", f"n > 2 * num_trim with num_trim={k}")
        ordered = _flatten(updates).sort(dim=0).values
        kept = ordered[k : len(updates) - k]
        return add(global_state, _unflatten(kept.mean(0), updates[0].delta))


class Krum(Aggregator):
    """Krum / Multi-Krum (Blanchard et al. 2017): average the m updates closest to their n-f-2 neighbours.

    ``num_byzantine`` is f, the number of attackers tolerated (needs n > 2f + 2); ``num_selected``
    m = 1 is Krum, m > 1 Multi-Krum. A client's score is the sum of squared distances to its n-f-2
    nearest others (unweighted; ties go to the lower client id); the m selected updates are averaged
    with ``weighting`` (``examples`` or ``uniform``, the paper's plain mean).
    """

    name = "krum"
    example_args = {"num_byzantine": 0, "num_selected": 1}

    def __init__(self, num_byzantine: int = 1, num_selected: int = 1, weighting: str = "examples") -> None:
        if num_byzantine < 0:
            raise ValueError(f"krum num_byzantine must be >= 0, got {num_byzantine}")
        if num_selected < 1:
            raise ValueError(f"krum num_selected must be >= 1, got {num_selected}")
        self.num_byzantine, self.num_selected = num_byzantine, num_selected
        self.weighting = check_weighting(weighting, "krum")

    def select(self, updates: list[DecodedUpdate]) -> list[int]:
        n, f = len(updates), self.num_byzantine
        _need(updates, max(2 * f + 3, self.num_selected), "krum", f"n > 2f + 2 with f={f}, and m={self.num_selected}")
        flat = _flatten(updates)
        distances = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
        closest = n - f - 2
        scores = [float(distances[i][torch.arange(n) != i].sort().values[:closest].sum()) for i in range(n)]
        return sorted(range(n), key=lambda i: (scores[i], updates[i].client_id))[: self.num_selected]

    def aggregate(self, global_state: State, updates: list[DecodedUpdate]) -> State:
        chosen = [updates[i] for i in self.select(updates)]
        weights = client_weights(chosen, self.weighting, "krum")
        return add(global_state, weighted_sum((u.delta for u in chosen), weights))


class NormBounding(Aggregator):
    """Norm bounding (Sun et al. 2019): clip every delta to L2 norm ``max_norm``, then FedAvg.

    The clipped deltas are averaged with ``weighting`` (``examples``, as FedAvg, or ``uniform``).
    """

    name = "norm_bounding"
    example_args = {"max_norm": 10.0}

    def __init__(self, max_norm: float = 1.0, weighting: str = "examples") -> None:
        if max_norm <= 0:
            raise ValueError(f"norm_bounding max_norm must be > 0, got {max_norm}")
        self.max_norm = max_norm
        self.weighting = check_weighting(weighting, "norm_bounding")

    def aggregate(self, global_state: State, updates: list[DecodedUpdate]) -> State:
        _need(updates, 1, "norm_bounding", "nothing to aggregate")
        norms = _flatten(updates).norm(dim=1)
        scales = [min(1.0, self.max_norm / float(n)) if float(n) > 0 else 1.0 for n in norms]
        weights = [s * w for s, w in zip(scales, client_weights(updates, self.weighting, "norm_bounding"))]
        return add(global_state, weighted_sum((u.delta for u in updates), weights))


class GeometricMedian(Aggregator):
    """Geometric median of the deltas by smoothed Weiszfeld iterations (RFA, Pillutla et al. 2022), example-weighted.

    Minimises ``Σ_k α_k ||z − Δ_k||`` with ``α`` from ``weighting``; ``eps`` is the smoothing ν (distances
    below it are clamped), iterations stop after ``max_iter`` or when z moves less than ``tol`` (relative).
    """

    name = "geometric_median"
    example_args = {"max_iter": 50}

    def __init__(self, max_iter: int = 100, eps: float = 1e-6, tol: float = 1e-7, weighting: str = "examples") -> None:
        if max_iter < 1:
            raise ValueError(f"geometric_median max_iter must be >= 1, got {max_iter}")
        if eps <= 0:
            raise ValueError(f"geometric_median eps must be > 0, got {eps}")
        if tol <= 0:
            raise ValueError(f"geometric_median tol must be > 0, got {tol}")
        self.max_iter, self.eps, self.tol = max_iter, eps, tol
        self.weighting = check_weighting(weighting, "geometric_median")

    def aggregate(self, global_state: State, updates: list[DecodedUpdate]) -> State:
        _need(updates, 1, "geometric_median", "nothing to aggregate")
        points = _flatten(updates)
        alpha = torch.tensor(client_weights(updates, self.weighting, "geometric_median"), dtype=torch.float64)
        median = (alpha[:, None] * points).sum(0)
        for _ in range(self.max_iter):
            beta = alpha / (points - median).norm(dim=1).clamp_min(self.eps)
            new = (beta[:, None] * points).sum(0) / beta.sum()
            moved = float((new - median).norm())
            median = new
            if moved <= self.tol * max(1.0, float(median.norm())):
                break
        return add(global_state, _unflatten(median, updates[0].delta))


@hookimpl
def fedlight_aggregators() -> list[type]:
    return [Median, TrimmedMean, Krum, NormBounding, GeometricMedian]
