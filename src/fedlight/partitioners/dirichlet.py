"""Dirichlet label-skew partitioner."""

from __future__ import annotations

import numpy as np

from fedlight.hookspecs import hookimpl
from fedlight.partitioners.base import Partitioner


class Dirichlet(Partitioner):
    """Label skew: each class is spread over clients with proportions ~ Dir(alpha) (Hsu et al. 2019).

    Small ``alpha`` (0.1) gives clients that see one or two classes; large ``alpha`` approaches IID.
    Draws are repeated (seeded) until every client holds at least ``min_size`` examples.
    """

    name = "dirichlet"
    example_args = {"alpha": 0.5, "min_size": 1}

    def __init__(self, alpha: float = 0.5, min_size: int = 2, max_tries: int = 100) -> None:
        if alpha <= 0:
            raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
        if min_size < 1:
            raise ValueError(f"dirichlet min_size must be >= 1, got {min_size}")
        self.alpha = alpha
        self.min_size = min_size
        self.max_tries = max_tries

    def split(self, labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        classes = np.unique(labels)
        for _ in range(self.max_tries):
            parts: list[list[int]] = [[] for _ in range(num_clients)]
            for c in classes:
                idx = rng.permutation(np.flatnonzero(labels == c))
                props = rng.dirichlet(np.full(num_clients, self.alpha))
                cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
                for client, chunk in enumerate(np.split(idx, cuts)):
                    parts[client].extend(chunk.tolist())
            if min(len(p) for p in parts) >= self.min_size:
                return [np.asarray(p) for p in parts]
        raise ValueError(
            f"dirichlet(alpha={self.alpha}) could not give all {num_clients} clients >= {self.min_size} examples "
            f"in {self.max_tries} draws; raise alpha, lower min_size or use fewer clients"
        )


@hookimpl
def fedlight_partitioners() -> list[type]:
    return [Dirichlet]
