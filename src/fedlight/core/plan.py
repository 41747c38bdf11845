"""RoundPlan: which clients train in a round and for how many local steps, from (seed, round) alone."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RoundPlan:
    round: int  # 1-based round index
    clients: tuple[int, ...]
    steps: tuple[int, ...]  # local optimisation steps of each sampled client, same order

    @property
    def total_steps(self) -> int:
        return sum(self.steps)


def plan_round(
    seed: int,
    round_idx: int,
    client_sizes: Sequence[int],
    clients_per_round: int,
    batch_size: int,
    local_steps: int | None,
    local_epochs: float | None,
) -> RoundPlan:
    """Seeded sampling without replacement; depends only on its arguments, so it is resumable.

    With ``local_steps`` every client takes that many steps; with ``local_epochs`` client k takes
    ``ceil(local_epochs * n_k / batch_size)`` steps, so larger clients train longer (as in FedAvg).
    """
    num_clients = len(client_sizes)
    if not 1 <= clients_per_round <= num_clients:
        raise ValueError(f"clients_per_round must be in [1, num_clients={num_clients}], got {clients_per_round}")
    rng = np.random.default_rng([seed, round_idx])
    clients = tuple(int(c) for c in np.sort(rng.choice(num_clients, size=clients_per_round, replace=False)))
    if local_steps is not None:
        steps = tuple(local_steps for _ in clients)
    else:
        assert local_epochs is not None
        steps = tuple(max(1, math.ceil(local_epochs * client_sizes[c] / batch_size)) for c in clients)
    return RoundPlan(round_idx, clients, steps)
