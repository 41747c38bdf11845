"""SCAFFOLD."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedlight.client_methods.base import ClientMethod, ClientState
from fedlight.core.state import State
from fedlight.hookspecs import hookimpl


class Scaffold(ClientMethod):
    """SCAFFOLD (Karimireddy et al. 2020): control variates correct client drift (option II update).

    Server control ``c`` (this plugin's checkpointed state) and client controls ``c_i`` (the
    client-state store, key ``"control"``; zero until a client first trains) cover the shared
    trainable tensors. Every round ``c`` travels down with the global state; each local step uses the
    gradient ``g − c_i + c``; after K local steps with learning rates η_1..η_K the client sets
    ``c_i⁺ = c_i − c + (x − y_i) / Σ_t η_t`` (option II: ``(x − y_i)/(Kη)`` for a constant η) and sends
    ``Δc_i = c_i⁺ − c_i`` up with its model delta; the server sets ``c ← c + (1/N) Σ_{i∈S} Δc_i``
    (N: all clients). Controls travel through the same codecs as the model state and their bytes
    are counted. Derived for SGD: with an adaptive client optimizer the correction is a heuristic.
    """

    name = "scaffold"
    sends_extra = True
    respects_client_views = False  # c − c_i is dense: it would train a client's zero-padded LoRA ranks

    def __init__(self) -> None:
        self.control: State = {}
        self._c: State = {}
        self._ci: State = {}
        self._lr_sum = 0.0

    def broadcast(self, global_state: State) -> State:
        if not self.control:
            self.control = {n: torch.zeros_like(global_state[n], dtype=torch.float32) for n in self.names}
        return self.control

    def start_client(self, client_id: int, start: State, received: State, client_state: ClientState) -> None:
        own = client_state.get("control")
        self._ci = {n: own[n].float() if own else torch.zeros_like(received[n]) for n in self.names}
        self._c = {n: received[n].float() for n in self.names}
        self._correction = {n: self._c[n] - self._ci[n] for n in self.names}
        self._lr_sum = 0.0

    def correct_gradients(self, params: Mapping[str, torch.nn.Parameter], lr: float) -> None:
        self._lr_sum += float(lr)
        for name in self.names:
            p = params[name]
            if p.grad is None:
                continue
            corr = self._correction[name]
            if corr.device != p.device:
                corr = self._correction[name] = corr.to(p.device)
            p.grad.add_(corr.to(p.grad.dtype))

    def finish_client(self, client_id: int, start: State, trained: State, client_state: ClientState) -> State:
        if self._lr_sum <= 0.0:  # no optimizer step was taken: the control stays as it was
            return {n: torch.zeros_like(self._ci[n]) for n in self.names}
        new = {n: self._ci[n] - self._c[n] + (start[n].float() - trained[n].float()) / self._lr_sum for n in self.names}
        delta = {n: new[n] - self._ci[n] for n in self.names}
        client_state["control"] = new
        return delta

    def server_update(self, extras: list[tuple[int, State]]) -> None:
        if not extras:
            return
        total = {n: torch.zeros_like(self.control[n], dtype=torch.float64) for n in self.names}
        for _, delta in extras:
            for n in self.names:
                total[n] += delta[n].double()
        self.control = {n: (self.control[n].double() + total[n] / self.num_clients).float() for n in self.names}

    def state_dict(self) -> dict[str, Any]:
        return {"control": dict(self.control)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.control = dict(state.get("control", {}))


@hookimpl
def fedlight_client_methods() -> list[type]:
    return [Scaffold]
