"""The privacy plugin kind."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from fedlight.core.plugin_base import Plugin
from fedlight.core.state import State
from fedlight.core.update import DecodedUpdate


@dataclass(frozen=True)
class RunSpec:
    """What a privacy mechanism may need to know about the run before round 1.

    ``client_steps[k]`` is the most local steps client k takes in a round it is sampled in;
    ``client_sampling`` is ``federation.client_sampling`` (``uniform`` or ``weighted``) and
    ``min_clients`` is ``federation.faults.min_clients`` (a mechanism whose guarantee needs every
    round released refuses a value above 1).
    """

    population: int
    clients_per_round: int
    rounds: int = 1
    batch_size: int = 1
    client_sizes: tuple[int, ...] = ()
    client_steps: tuple[int, ...] = field(default=())
    client_sampling: str = "uniform"
    min_clients: int = 1


class Privacy(Plugin):
    """Base class: transforms at the three points where a mechanism can act.

    ``client_transform`` runs on the client before encoding (local DP, client-side clipping);
    ``server_transform`` runs on the decoded updates before aggregation (central clipping);
    ``post_aggregate`` runs on the new global state (central noise). ``epsilon()`` is the privacy
    spent so far at the mechanism's delta, or None when the mechanism gives no DP guarantee.
    ``on_round_end`` is called after every round in which clients were queried, even if every update
    was lost or rejected (the privacy cost is paid when clients are asked, not when they answer).
    """

    #: noise calibrated to an unweighted mean of clipped updates: needs ``fedavg`` with uniform weighting
    requires_uniform_mean: ClassVar[bool] = False
    #: acts inside local training (per-example): the module calls :meth:`private_step` for every batch
    per_sample: ClassVar[bool] = False
    #: False only for a mechanism that changes nothing (``none``): extra tensors a client method sends
    #: in the clear are then no weaker than the update itself (``core.compat``)
    protects_updates: ClassVar[bool] = True
    #: how each step's batch must be drawn for the accounting to hold: ``shuffle`` (passes over a
    #: reshuffled client dataset) or ``subsample`` (every step an independent uniform subset of
    #: ``batch_size`` examples without replacement, what ``SampledWithoutReplacementDpEvent`` assumes)
    batch_sampling: ClassVar[str] = "shuffle"

    @property
    def cohort_sampling(self) -> str:
        """How the round plan must draw each round's clients for this mechanism's accounting to hold.

        ``fixed``: exactly ``clients_per_round`` clients (uniform without replacement, or as
        ``federation.client_sampling`` says). ``poisson``: every client independently with
        probability ``clients_per_round / num_clients`` (a variable cohort, possibly empty); the
        round then always releases ``post_aggregate``'s output, even with no update.
        """
        return "fixed"

    def bind(self, population: int, clients_per_round: int) -> None:
        """Receive the run's sampling (clients in the federation, clients per round) before round 1."""

    def bind_run(self, spec: RunSpec) -> None:
        """Receive the whole run's shape before round 1 (default: :meth:`bind` with its sampling)."""
        self.bind(spec.population, spec.clients_per_round)

    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError (before round 1) if the mechanism cannot be sound on this model."""

    def on_client_start(self, client_id: int, generator: torch.Generator) -> None:
        """A sampled client starts local training; ``generator`` is its seeded noise source."""

    def secure_clip_norm(self) -> float | None:
        """Under secure aggregation the server cannot clip: the L2 bound each client applies itself, if any."""
        return None

    def secure_aggregation_problem(self) -> str | None:
        """Why this mechanism cannot run under secure aggregation (None: it can).

        The server never sees individual updates there, so a mechanism that transforms them on the
        server (``server_transform``) must say how the client does it instead (``secure_clip_norm``).
        """
        if type(self).server_transform is not Privacy.server_transform and self.secure_clip_norm() is None:
            return "transforms individual updates on the server, which never sees them under secure aggregation"
        return None

    def metrics(self) -> dict[str, float]:
        """Extra per-round values for rounds.csv (besides ``epsilon``)."""
        return {}

    def on_round_end(self) -> None:
        """Account for one round."""

    def would_exceed(self, next_rounds: int = 1) -> bool:
        """Whether ``next_rounds`` more rounds would spend more than the configured budget."""
        return False

    def client_transform(self, delta: State, generator: torch.Generator) -> State:
        return delta

    def server_transform(self, updates: list[DecodedUpdate], generator: torch.Generator) -> list[DecodedUpdate]:
        return updates

    def post_aggregate(
        self, old_global: State, new_global: State, num_updates: int, generator: torch.Generator
    ) -> State:
        return new_global

    def epsilon(self) -> float | None:
        return None
