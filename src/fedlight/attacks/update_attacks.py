"""Model-poisoning attacks on the updates malicious clients send."""

from __future__ import annotations

from statistics import NormalDist

import torch

from fedlight.attacks.base import Attack
from fedlight.core.state import State
from fedlight.hookspecs import hookimpl


class SignFlip(Attack):
    """Sign flipping: send -scale x the honest update (Damaskinos et al. 2018)."""

    name = "sign_flip"
    colludes = False  # a function of the attacker's own delta
    example_args = {"scale": 1.0}

    def __init__(self, scale: float = 1.0) -> None:
        if scale <= 0:
            raise ValueError(f"sign_flip scale must be > 0, got {scale}")
        self.scale = scale

    def poison_updates(self, deltas: list[State], num_clients: int, generator: torch.Generator) -> list[State]:
        return [{k: -self.scale * v for k, v in d.items()} for d in deltas]


class GaussianNoise(Attack):
    """Gaussian attack: send N(0, std^2) noise instead of the update (Fang et al. 2020)."""

    name = "gaussian_noise"
    example_args = {"std": 0.1}

    def __init__(self, std: float = 1.0) -> None:
        if std <= 0:
            raise ValueError(f"gaussian_noise std must be > 0, got {std}")
        self.std = std

    def poison_updates(self, deltas: list[State], num_clients: int, generator: torch.Generator) -> list[State]:
        return [
            {k: torch.randn(v.shape, generator=generator, dtype=torch.float32) * self.std for k, v in d.items()}
            for d in deltas
        ]


class Scaling(Attack):
    """Scaling / model replacement: boost the update by a factor so it survives averaging (Bagdasaryan et al. 2020)."""

    name = "scaling"
    colludes = False  # a function of the attacker's own delta
    example_args = {"factor": 3.0}

    def __init__(self, factor: float = 10.0) -> None:
        if factor <= 0:
            raise ValueError(f"scaling factor must be > 0, got {factor}")
        self.factor = factor

    def poison_updates(self, deltas: list[State], num_clients: int, generator: torch.Generator) -> list[State]:
        return [{k: self.factor * v for k, v in d.items()} for d in deltas]


class ALIE(Attack):
    """A Little Is Enough (Baruch et al. 2019): all attackers send mean - z * std of their honest updates.

    ``z`` defaults to the paper's z_max for n clients of which m are malicious:
    s = floor(n/2 + 1) - m, z = Phi^-1((n - s) / n), the largest shift that still hides among the
    honest majority for median/Krum-style defences.
    """

    name = "alie"
    example_args = {}

    def __init__(self, z: float | None = None) -> None:
        self.z = z

    def z_for(self, num_clients: int, num_malicious: int) -> float:
        if self.z is not None:
            return self.z
        s = num_clients // 2 + 1 - num_malicious
        p = min(max((num_clients - s) / num_clients, 1e-6), 1 - 1e-6)
        return NormalDist().inv_cdf(p)

    def poison_updates(self, deltas: list[State], num_clients: int, generator: torch.Generator) -> list[State]:
        if len(deltas) < 2:
            return deltas  # one attacker has no statistics to hide behind
        z = self.z_for(num_clients, len(deltas))
        poisoned = {}
        for name in deltas[0]:
            stacked = torch.stack([d[name].float() for d in deltas])
            poisoned[name] = stacked.mean(0) - z * stacked.std(0)
        return [dict(poisoned) for _ in deltas]


@hookimpl
def fedlight_attacks() -> list[type]:
    return [SignFlip, GaussianNoise, Scaling, ALIE]
