"""RoundPlan: which clients train in a round and for how many local steps, from (seed, round) alone."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedlight.core.seeds import plan_rng


@dataclass(frozen=True)
class RoundPlan:
    """A round, decided up front: who is sampled, who trains for how long, whose update will be lost.

    ``training`` are the sampled clients that train (with ``steps`` local steps each, same order);
    ``dropped_before`` never start; ``lost`` train but their update never arrives (dropout after
    training, or a straggler past the deadline under the ``drop`` policy). ``placeholder``: nobody
    was sampled (an empty Poisson cohort); ``training`` then holds one client whose single step only
    keeps Lightning's epoch non-empty and whose update is discarded (it is in ``lost``).
    ``batches``: how each local step's batch is drawn (``shuffle``: passes over the reshuffled
    client data; ``subsample``: every step an independent uniform subset without replacement).
    """

    round: int  # 1-based round index
    clients: tuple[int, ...]
    training: tuple[int, ...]
    steps: tuple[int, ...]
    dropped_before: tuple[int, ...] = ()
    lost: tuple[int, ...] = ()
    placeholder: bool = False
    batches: str = "shuffle"

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
    dropout_before: float = 0.0,
    dropout_after: float = 0.0,
    deadline_steps: int | None = None,
    straggler_policy: str = "partial",
    sampling: str = "uniform",
    step_scale: Sequence[float] | None = None,
    poisson_rate: float | None = None,
    batches: str = "shuffle",
) -> RoundPlan:
    """Seeded sampling without replacement; depends only on its arguments, so it is resumable.

    With ``local_steps`` every client takes that many steps; with ``local_epochs`` client k takes
    ``ceil(local_epochs * n_k / batch_size)`` steps, so larger clients train longer (as in FedAvg).
    A client needing more than ``deadline_steps`` is a straggler: under ``partial`` it sends what it
    has after ``deadline_steps`` steps, under ``drop`` its update is lost. Lightning cannot run an
    epoch without batches, so when every sampled client drops before training the first one still
    runs one step whose update is discarded (it is listed in ``lost``).

    ``sampling: weighted`` draws clients with probability proportional to their data size n_k
    (successive draws without replacement, so with several clients per round the inclusion
    probabilities are only approximately proportional). ``step_scale[k]`` (a compute-tier fraction)
    scales client k's steps to ``max(1, ceil(step_scale[k] * steps))`` before the deadline applies.

    ``poisson_rate`` q (set only when the privacy mechanism's accounting needs it, see
    ``Privacy.cohort_sampling``): instead of exactly ``clients_per_round`` clients, every client is
    included independently with probability q (Poisson sampling, McMahan et al. 2018), so the cohort
    size is Binomial(num_clients, q) and may be 0. ``batches`` is copied into the plan.
    """
    num_clients = len(client_sizes)
    if not 1 <= clients_per_round <= num_clients:
        raise ValueError(f"clients_per_round must be in [1, num_clients={num_clients}], got {clients_per_round}")
    if batches not in ("shuffle", "subsample"):
        raise ValueError(f"batches must be 'shuffle' or 'subsample', got {batches!r}")
    rng = plan_rng(seed, round_idx)
    if poisson_rate is not None:
        if not 0 < poisson_rate <= 1:
            raise ValueError(f"poisson_rate must be in (0, 1], got {poisson_rate}")
        if sampling != "uniform":
            raise ValueError(
                f"Poisson client sampling includes every client at the same rate; got sampling {sampling!r}"
            )
        chosen = np.flatnonzero(rng.random(num_clients) < poisson_rate)
    elif sampling == "weighted":
        p = np.asarray(client_sizes, dtype=np.float64)
        if (p > 0).sum() < clients_per_round:
            raise ValueError(f"weighted sampling needs >= clients_per_round={clients_per_round} non-empty clients")
        chosen = rng.choice(num_clients, size=clients_per_round, replace=False, p=p / p.sum())
    elif sampling == "uniform":
        chosen = rng.choice(num_clients, size=clients_per_round, replace=False)
    else:
        raise ValueError(f"client sampling must be 'uniform' or 'weighted', got {sampling!r}")
    clients = tuple(int(c) for c in np.sort(chosen))
    if local_steps is not None:
        wanted = {c: local_steps for c in clients}
    else:
        assert local_epochs is not None
        wanted = {c: max(1, math.ceil(local_epochs * client_sizes[c] / batch_size)) for c in clients}
    if step_scale is not None:
        wanted = {c: max(1, math.ceil(step_scale[c] * s - 1e-9)) for c, s in wanted.items()}
    before = rng.random(len(clients)) < dropout_before
    after = rng.random(len(clients)) < dropout_after
    dropped_before = tuple(c for c, b in zip(clients, before) if b)
    training = [c for c in clients if c not in dropped_before]
    lost = [c for c, a in zip(clients, after) if a and c in training]
    if deadline_steps is not None:
        late = [c for c in training if wanted[c] > deadline_steps]
        if straggler_policy == "drop":
            lost.extend(c for c in late if c not in lost)
        else:
            wanted.update({c: deadline_steps for c in late})
    placeholder = not clients
    if not training:
        # an empty Poisson cohort: a client with data runs the placeholder step (nobody was sampled)
        first = clients[0] if clients else next((c for c, n in enumerate(client_sizes) if n > 0), 0)
        training, wanted[first] = [first], 1
        dropped_before = tuple(c for c in dropped_before if c != first)
        lost.append(first)
    return RoundPlan(
        round_idx, clients, tuple(training), tuple(wanted[c] for c in training), dropped_before, tuple(sorted(lost)),
        placeholder, batches,
    )  # fmt: skip
