"""The privacy budget: refuse a run that cannot afford one round, stop before a round would overspend."""

from __future__ import annotations

from fedlight.core.engine import RoundEngine
from fedlight.features.base import RoundFeature


class PrivacyBudget(RoundFeature):
    """Stops the run after the last round the privacy plugin's budget (``target_epsilon``) allows."""

    name = "privacy_budget"

    def attach(self, engine: RoundEngine) -> None:
        privacy = engine.privacy
        if privacy.would_exceed(1):
            raise ValueError(
                f"one more round would exceed the privacy budget (epsilon now {privacy.epsilon()}); "
                "raise target_epsilon or the noise multiplier"
            )

    def stop_reason(self, engine: RoundEngine) -> str | None:
        privacy, r = engine.privacy, engine.round.round
        if r < engine.schedule.rounds and privacy.would_exceed(1):
            return f"another round would exceed the privacy budget (epsilon {privacy.epsilon():.3f})"
        return None
