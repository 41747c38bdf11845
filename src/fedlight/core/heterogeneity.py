"""System heterogeneity: clients with different compute budgets, fixed per client and seeded."""

from __future__ import annotations

from dataclasses import dataclass

from fedlight.core.seeds import Purpose, run_rng

SAMPLING = ("uniform", "weighted")


@dataclass
class ComputeTiers:
    """The ``federation.compute_tiers`` section: each client belongs to one compute tier for the whole run.

    A client in a tier with fraction f takes ``max(1, ceil(f · s))`` local steps, where s is what
    ``local_steps`` / ``local_epochs`` would give it (so tiers compose with both). Clients are assigned
    to tiers once, seeded by the sampling seed, with probabilities ``probs`` (equal by default).

    Args:
        fractions: compute budget of each tier as a fraction of the full local work, in (0, 1].
        probs: probability of a client falling into each tier (sums to 1); null = equal.
    """

    fractions: list[float]
    probs: list[float] | None = None

    def __post_init__(self) -> None:
        if not self.fractions:
            raise ValueError("federation.compute_tiers.fractions must list at least one tier")
        for f in self.fractions:
            if not 0.0 < f <= 1.0:
                raise ValueError(f"federation.compute_tiers.fractions must be in (0, 1], got {f}")
        if self.probs is not None:
            if len(self.probs) != len(self.fractions):
                raise ValueError(
                    f"federation.compute_tiers.probs has {len(self.probs)} entries for {len(self.fractions)} fractions"
                )
            if any(p < 0 for p in self.probs) or abs(sum(self.probs) - 1.0) > 1e-6:
                raise ValueError(f"federation.compute_tiers.probs must be >= 0 and sum to 1, got {self.probs}")

    def assign(self, num_clients: int, seed: int) -> list[float]:
        """Each client's compute fraction, a function of (seed, num_clients) only."""
        rng = run_rng(seed, Purpose.COMPUTE_TIERS)
        tiers = rng.choice(len(self.fractions), size=num_clients, p=self.probs)
        return [float(self.fractions[t]) for t in tiers]


def check_sampling(sampling: str) -> str:
    if sampling not in SAMPLING:
        raise ValueError(f"federation.client_sampling must be 'uniform' or 'weighted', got {sampling!r}")
    return sampling
