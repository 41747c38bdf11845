"""Pathological non-IID shards partitioner."""

from __future__ import annotations

import numpy as np

from fedlight.hookspecs import hookimpl
from fedlight.partitioners.base import Partitioner


class Shards(Partitioner):
    """Pathological label skew: each client gets k single-class shards (McMahan et al. 2017).

    The paper sorts examples by label, cuts them into ``num_clients * k`` shards and deals ``k`` to each
    client (k=2 on MNIST). Here every shard is cut *within* one class, so a client holds at most
    ``classes_per_client`` (k) classes — the paper's contiguous cuts can straddle two classes. Shards are
    allotted to classes in proportion to class size (at least one each; largest remainder), so every
    example is used; needs ``num_clients * k >= number of classes``.
    """

    name = "shards"
    example_args = {"classes_per_client": 2}

    def __init__(self, classes_per_client: int = 2) -> None:
        if classes_per_client < 1:
            raise ValueError(f"shards classes_per_client must be >= 1, got {classes_per_client}")
        self.classes_per_client = classes_per_client

    def split(self, labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        classes, counts = np.unique(labels, return_counts=True)
        total_shards = num_clients * self.classes_per_client
        if total_shards < len(classes):
            raise ValueError(
                f"shards: num_clients * classes_per_client = {total_shards} is fewer than the {len(classes)} classes, "
                "so some examples could not be placed; raise classes_per_client or num_clients"
            )
        if total_shards > len(labels):
            raise ValueError(f"shards: {total_shards} shards need at least as many examples, got {len(labels)}")
        per_class = _allot(counts, total_shards)
        shards: list[np.ndarray] = []
        for c, k in zip(classes, per_class):
            shards.extend(np.array_split(rng.permutation(np.flatnonzero(labels == c)), k))
        order = rng.permutation(total_shards)
        # shard order[j] goes to client j % num_clients: exactly k shards (<= k classes) per client
        return [np.concatenate([shards[s] for s in order[i::num_clients]]) for i in range(num_clients)]


def _allot(counts: np.ndarray, total: int) -> np.ndarray:
    """``total`` shards over classes proportional to ``counts``: each class >= 1 and <= its size."""
    alloc = np.ones(len(counts), dtype=np.int64)
    spare = total - len(counts)
    while spare > 0:
        room = counts - alloc
        share = (counts / counts.sum()) * total - alloc  # how far each class is below its fair share
        share[room <= 0] = -np.inf
        give = int(np.argmax(share))  # ties -> lowest class, deterministic
        alloc[give] += 1
        spare -= 1
    return alloc


@hookimpl
def fedlight_partitioners() -> list[type]:
    return [Shards]
