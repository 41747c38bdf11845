"""FedAvg."""

from __future__ import annotations

from fedlight.aggregators.base import Aggregator, check_weighting, weighted_mean_delta
from fedlight.core.state import State, add
from fedlight.core.update import DecodedUpdate
from fedlight.hookspecs import hookimpl


class FedAvg(Aggregator):
    """Federated averaging (McMahan et al. 2017): global + weighted mean of client deltas.

    ``weighting: examples`` weights client k by its number of training examples n_k (the paper's
    rule); ``uniform`` weights every client equally.
    """

    name = "fedavg"
    sum_based = True

    def __init__(self, weighting: str = "examples") -> None:
        self.weighting = check_weighting(weighting, "fedavg")

    def uniform_mean(self) -> bool:
        return self.weighting == "uniform"

    def aggregate(self, global_state: State, updates: list[DecodedUpdate]) -> State:
        return add(global_state, weighted_mean_delta(updates, self.weighting, "fedavg"))


@hookimpl
def fedlight_aggregators() -> list[type]:
    return [FedAvg]
