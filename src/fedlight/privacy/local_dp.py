"""Local differential privacy: each client clips and noises its own delta before it leaves."""

from __future__ import annotations

from typing import Any, Literal

import torch

from fedlight.core.state import State
from fedlight.hookspecs import hookimpl
from fedlight.privacy.accounting import Accountant, check_mechanism_args
from fedlight.privacy.base import Privacy
from fedlight.privacy.dp_fedavg import clip_state, gaussian_like


class LocalDP(Privacy):
    """Local DP: each client clips its delta to C and adds Gaussian noise sigma*C (Gaussian mechanism, Dwork & Roth 2014).

    The guarantee holds against the server itself, so there is **no amplification by sampling**
    (the server knows whom it sampled). Local adjacency: *any* two client inputs are neighbours, so
    the clipped delta's sensitivity is 2C and each release is a Gaussian mechanism with noise
    multiplier ``sigma / 2``. ``epsilon()`` is the per-client ε at ``delta`` after as many
    participations as rounds so far (the worst case: a client sampled every round), composed by
    the RDP accountant of dp-accounting.

    Args:
        noise_multiplier: sigma; the noise std added to each coordinate is ``sigma * clip_norm``.
        clip_norm: C, the bound on the global L2 norm of each client's delta.
        delta: the delta at which ``epsilon()`` is reported.
        accountant: ``rdp`` or ``pld``.
    """

    name = "local_dp"
    example_args = {"noise_multiplier": 1.0, "clip_norm": 1.0}

    def __init__(
        self,
        noise_multiplier: float = 1.0,
        clip_norm: float = 1.0,
        delta: float = 1e-5,
        accountant: Literal["rdp", "pld"] = "rdp",
    ) -> None:
        check_mechanism_args(
            "local_dp",
            noise_multiplier=noise_multiplier,
            delta=delta,
            bounds={"clip_norm": clip_norm},
            accountant=accountant,
        )
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)
        self.delta = float(delta)
        self.accountant = Accountant(accountant, neighboring="add_remove")

    def client_transform(self, delta: State, generator: torch.Generator) -> State:
        clipped, _ = clip_state(delta, self.clip_norm)
        noise = gaussian_like(clipped, self.noise_multiplier * self.clip_norm, generator)
        return {k: (v.float() + noise[k]).to(v.dtype) for k, v in clipped.items()}

    def on_round_end(self) -> None:
        self.on_round()

    def on_round(self) -> None:
        """One more participation of (at worst) every client: a Gaussian with multiplier sigma/2."""
        self.accountant.compose(self.noise_multiplier / 2, 1.0, 1, "poisson")

    def epsilon(self) -> float:
        return self.accountant.epsilon(self.delta)

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])


@hookimpl
def fedlight_privacy() -> list[type]:
    return [LocalDP]
