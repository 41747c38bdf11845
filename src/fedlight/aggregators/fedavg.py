"""FedAvg."""

from __future__ import annotations

from fedlight.aggregators.base import Aggregator
from fedlight.core.state import State, add, weighted_sum
from fedlight.core.update import DecodedUpdate
from fedlight.hookspecs import hookimpl


class FedAvg(Aggregator):
    """Federated averaging (McMahan et al. 2017): global + weighted mean of client deltas.

    ``weighting: examples`` weights client k by its number of training examples n_k (the paper's
    rule); ``uniform`` weights every client equally.
    """

    name = "fedavg"

    def __init__(self, weighting: str = "examples") -> None:
        if weighting not in ("examples", "uniform"):
            raise ValueError(f"fedavg weighting must be 'examples' or 'uniform', got {weighting!r}")
        self.weighting = weighting

    def aggregate(self, global_state: State, updates: list[DecodedUpdate]) -> State:
        if not updates:
            raise ValueError("fedavg needs at least one update")
        raw = [float(u.num_examples) if self.weighting == "examples" else 1.0 for u in updates]
        total = sum(raw)
        if total <= 0:
            raise ValueError("fedavg: all client weights are zero")
        mean_delta = weighted_sum((u.delta for u in updates), (w / total for w in raw))
        return add(global_state, mean_delta)


@hookimpl
def fedlight_aggregators() -> list[type]:
    return [FedAvg]
