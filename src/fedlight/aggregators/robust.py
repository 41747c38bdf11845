"""Byzantine-robust aggregators: each is a drop-in replacement for FedAvg's weighted mean of deltas."""

from __future__ import annotations

import math

import torch

from fedlight.aggregators.base import Aggregator
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
    """Coordinate-wise trimmed mean (Yin et al. 2018): drop the beta fraction largest and smallest values."""

    name = "trimmed_mean"
    example_args = {"beta": 0.1}

    def __init__(self, beta: float = 0.1) -> None:
        if not 0.0 <= beta < 0.5:
            raise ValueError(f"trimmed_mean beta must be in [0, 0.5), got {beta}")
        self.beta = beta

    def aggregate(self, global_state: State, updates: list[DecodedUpdate]) -> State:
        _need(updates, 1, "trimmed_mean", "nothing to aggregate")
        k = math.floor(self.beta * len(updates))  # beta < 0.5 always leaves at least one value
        ordered = _flatten(updates).sort(dim=0).values
        kept = ordered[k : len(updates) - k]
        return add(global_state, _unflatten(kept.mean(0), updates[0].delta))


class Krum(Aggregator):
    """Krum / Multi-Krum (Blanchard et al. 2017): average the m updates closest to their n-f-2 neighbours.

    ``num_byzantine`` is f, the number of attackers tolerated (needs n > 2f + 2); ``num_selected``
    m = 1 is Krum, m > 1 Multi-Krum (selected updates are averaged weighted by examples).
    """

    name = "krum"
    example_args = {"num_byzantine": 0, "num_selected": 1}

    def __init__(self, num_byzantine: int = 1, num_selected: int = 1) -> None:
        if num_byzantine < 0:
            raise ValueError(f"krum num_byzantine must be >= 0, got {num_byzantine}")
        if num_selected < 1:
            raise ValueError(f"krum num_selected must be >= 1, got {num_selected}")
        self.num_byzantine, self.num_selected = num_byzantine, num_selected

    def select(self, updates: list[DecodedUpdate]) -> list[int]:
        n, f = len(updates), self.num_byzantine
        _need(updates, max(2 * f + 3, self.num_selected), "krum", f"n > 2f + 2 with f={f}, and m={self.num_selected}")
        flat = _flatten(updates)
        distances = torch.cdist(flat, flat).pow(2)
        closest = n - f - 2
        scores = [float(distances[i][torch.arange(n) != i].sort().values[:closest].sum()) for i in range(n)]
        return sorted(range(n), key=lambda i: (scores[i], updates[i].client_id))[: self.num_selected]

    def aggregate(self, global_state: State, updates: list[DecodedUpdate]) -> State:
        chosen = [updates[i] for i in self.select(updates)]
        total = sum(u.num_examples for u in chosen) or len(chosen)
        weights = [(u.num_examples or 1) / total for u in chosen]
        return add(global_state, weighted_sum((u.delta for u in chosen), weights))


class NormBounding(Aggregator):
    """Norm bounding (Sun et al. 2019): clip every delta to L2 norm ``max_norm``, then FedAvg."""

    name = "norm_bounding"
    example_args = {"max_norm": 10.0}

    def __init__(self, max_norm: float = 1.0) -> None:
        if max_norm <= 0:
            raise ValueError(f"norm_bounding max_norm must be > 0, got {max_norm}")
        self.max_norm = max_norm

    def aggregate(self, global_state: State, updates: list[DecodedUpdate]) -> State:
        _need(updates, 1, "norm_bounding", "nothing to aggregate")
        norms = _flatten(updates).norm(dim=1)
        scales = [min(1.0, self.max_norm / float(n)) if float(n) > 0 else 1.0 for n in norms]
        total = sum(u.num_examples for u in updates)
        weights = [s * u.num_examples / total for s, u in zip(scales, updates)]
        return add(global_state, weighted_sum((u.delta for u in updates), weights))


class GeometricMedian(Aggregator):
    """Geometric median of the deltas by smoothed Weiszfeld iterations (RFA, Pillutla et al. 2022), example-weighted."""

    name = "geometric_median"
    example_args = {"max_iter": 50}

    def __init__(self, max_iter: int = 100, eps: float = 1e-6, tol: float = 1e-7) -> None:
        if max_iter < 1 or eps <= 0 or tol <= 0:
            raise ValueError("geometric_median needs max_iter >= 1, eps > 0 and tol > 0")
        self.max_iter, self.eps, self.tol = max_iter, eps, tol

    def aggregate(self, global_state: State, updates: list[DecodedUpdate]) -> State:
        _need(updates, 1, "geometric_median", "nothing to aggregate")
        points = _flatten(updates)
        alpha = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
        alpha = alpha / alpha.sum()
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
