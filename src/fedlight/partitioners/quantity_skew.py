"""Quantity-skew partitioner."""

from __future__ import annotations

import numpy as np

from fedlight.hookspecs import hookimpl
from fedlight.partitioners.base import Partitioner


class QuantitySkew(Partitioner):
    """Quantity skew: log-normal client sizes, IID labels (unbalanced setting of Acar et al. 2021, FedDyn).

    Client sizes are proportional to draws from LogNormal(0, ``sigma``) (seeded): ``sigma = 0`` gives
    equal sizes, 1–2 gives a few large and many small clients. Every client gets at least ``min_size``
    examples; which examples go where is uniformly random, so label mixes stay near IID.
    """

    name = "quantity_skew"
    example_args = {"sigma": 1.0}

    def __init__(self, sigma: float = 1.0, min_size: int = 1) -> None:
        if sigma < 0:
            raise ValueError(f"quantity_skew sigma must be >= 0, got {sigma}")
        if min_size < 1:
            raise ValueError(f"quantity_skew min_size must be >= 1, got {min_size}")
        self.sigma = sigma
        self.min_size = min_size

    def sizes(self, num_examples: int, num_clients: int, rng: np.random.Generator) -> np.ndarray:
        spare = num_examples - num_clients * self.min_size
        if spare < 0:
            raise ValueError(
                f"quantity_skew: {num_clients} clients x min_size {self.min_size} exceeds the {num_examples} examples"
            )
        props = rng.lognormal(mean=0.0, sigma=self.sigma, size=num_clients)
        props /= props.sum()
        exact = props * spare
        sizes = np.floor(exact).astype(np.int64)
        rest = spare - int(sizes.sum())
        sizes[np.argsort(-(exact - sizes), kind="stable")[:rest]] += 1  # largest remainders
        return sizes + self.min_size

    def split(self, labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        sizes = self.sizes(len(labels), num_clients, rng)
        perm = rng.permutation(len(labels))
        return list(np.split(perm, np.cumsum(sizes)[:-1]))


@hookimpl
def fedlight_partitioners() -> list[type]:
    return [QuantitySkew]
