"""IID partitioner."""

from __future__ import annotations

import numpy as np

from fedlight.hookspecs import hookimpl
from fedlight.partitioners.base import Partitioner


class IID(Partitioner):
    """Uniformly random, near-equal client shards (sizes differ by at most one)."""

    name = "iid"

    def split(self, labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
        perm = np.random.default_rng(seed).permutation(len(labels))
        return list(np.array_split(perm, num_clients))


@hookimpl
def fedlight_partitioners() -> list[type]:
    return [IID]
