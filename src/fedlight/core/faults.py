"""Simulated client faults: dropouts, stragglers, and what a round does when too few updates arrive."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ClientFaults:
    """The ``federation.faults`` section.

    Args:
        dropout_before: probability that a sampled client never starts the round.
        dropout_after: probability that a client trains but its update never arrives.
        deadline_steps: round deadline in local steps; a client needing more is a straggler.
        straggler_policy: ``partial`` (send after ``deadline_steps`` steps) or ``drop`` (update lost).
        min_clients: fewest accepted updates a round needs to change the global model.
        on_too_few_clients: ``skip`` the round (global state unchanged, logged) or ``stop`` training
            with an error (the last round checkpoint stays intact for a resume).
    """

    dropout_before: float = 0.0
    dropout_after: float = 0.0
    deadline_steps: int | None = None
    straggler_policy: Literal["partial", "drop"] = "partial"
    min_clients: int = 1
    on_too_few_clients: Literal["skip", "stop"] = "skip"

    def __post_init__(self) -> None:
        for field in ("dropout_before", "dropout_after"):
            value = getattr(self, field)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"federation.faults.{field} must be in [0, 1), got {value}")
        if self.deadline_steps is not None and self.deadline_steps < 1:
            raise ValueError(f"federation.faults.deadline_steps must be >= 1 or null, got {self.deadline_steps}")
        if self.min_clients < 1:
            raise ValueError(f"federation.faults.min_clients must be >= 1, got {self.min_clients}")


class TooFewClientsError(RuntimeError):
    """Raised under ``on_too_few_clients: stop``."""
