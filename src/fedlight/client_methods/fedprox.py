"""FedProx."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedlight.client_methods.base import ClientMethod, ClientState, check_nonnegative
from fedlight.core.state import State
from fedlight.hookspecs import hookimpl


class FedProx(ClientMethod):
    """FedProx (Li et al. 2020): local objective plus the proximal term μ/2·‖w − w_global‖².

    Applied as its gradient, ``g += μ·(w − w_global)``, on every shared trainable tensor before each
    local optimizer step (the same gradient autograd gives for ``loss + μ/2·‖w − w_global‖²``; the
    logged ``train_loss`` is the task loss without the term). ``w_global`` is the decoded broadcast the
    client started from. Nothing extra travels. ``mu: 0`` is plain FedAvg, bit for bit.
    """

    name = "fedprox"
    example_args = {"mu": 0.1}

    def __init__(self, mu: float = 0.01) -> None:
        self.mu = check_nonnegative(mu, "federation.client_method.mu (fedprox)")
        self._anchor: State = {}

    def start_client(self, client_id: int, start: State, received: State, client_state: ClientState) -> None:
        self._anchor = {n: start[n] for n in self.names}

    def correct_gradients(self, params: Mapping[str, torch.nn.Parameter], lr: float) -> None:
        for name in self.names:
            p = params[name]
            if p.grad is None:
                continue
            anchor = self._anchor[name]
            if anchor.device != p.device:
                anchor = self._anchor[name] = anchor.to(p.device)
            p.grad.add_((p.detach().float() - anchor.float()).to(p.grad.dtype), alpha=self.mu)


@hookimpl
def fedlight_client_methods() -> list[type]:
    return [FedProx]
