"""Update norms per round: the worked example of a round feature (docs/plugins.md).

Each client measures the L2 norm of its update (trained − start) and sends it with its metrics, so
the value reaches the server on every engine; the server logs the mean and max over the round's
accepted updates. Its state (rounds seen) shows how a feature is checkpointed.
"""

from __future__ import annotations

from typing import Any

from fedlight.core.engine import ClientRun, RoundEngine, RoundState
from fedlight.core.state import State, global_norm, subtract
from fedlight.core.update import ClientUpdate
from fedlight.features.base import RoundFeature
from fedlight.hookspecs import hookimpl


class UpdateNorms(RoundFeature):
    """Logs ``update_norm_mean`` / ``update_norm_max`` of the accepted updates every round."""

    name = "update_norms"

    def __init__(self) -> None:
        self.rounds_seen = 0

    def on_client_end(
        self, engine: RoundEngine, client: ClientRun, trained: State, update: ClientUpdate | None
    ) -> None:
        if update is not None:
            update.metrics["update_norm"] = global_norm(subtract(trained, client.start))

    def round_metrics(self, engine: RoundEngine, round: RoundState) -> dict[str, float]:
        self.rounds_seen += 1
        accepted = set(round.report.accepted) if round.report is not None else set()
        norms = [
            float(u.metrics["update_norm"])
            for u in round.updates
            if u.client_id in accepted and "update_norm" in u.metrics
        ]
        if not norms:
            return {}
        return {"update_norm_mean": sum(norms) / len(norms), "update_norm_max": max(norms)}

    def state_dict(self) -> dict[str, Any]:
        return {"rounds_seen": self.rounds_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds_seen = int(state.get("rounds_seen", 0))


@hookimpl
def fedlight_round_features() -> list[type]:
    return [UpdateNorms]
