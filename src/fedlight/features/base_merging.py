"""Merging into the frozen base, for aggregators that declare ``merges_into_base`` (FedEx-LoRA, FLoRA)."""

from __future__ import annotations

from typing import Any

import torch

from fedlight.core.engine import ClientRun, RoundEngine, RoundState
from fedlight.core.server import AggregationReport
from fedlight.core.state import State
from fedlight.features.base import RoundFeature


class MergeIntoBase(RoundFeature):
    """Adds the aggregator's base delta to the frozen weights and broadcasts the cumulative change to every client."""

    name = "base_merging"
    key = "base_total"  # the checkpoint key fedlight has always used: old round checkpoints resume

    def __init__(self) -> None:
        self.base_total: State = {}  # Σ of merged base deltas: what a stateless client must receive
        self._applied: State = {}  # what a remote client has added to its own frozen weights so far

    def attach(self, engine: RoundEngine) -> None:
        engine.module.kept_frozen = set(self.base_total)  # merged base weights go into round checkpoints

    def on_round_start(self, engine: RoundEngine, round: RoundState) -> None:
        if self.base_total:
            round.broadcasts[self.key] = engine.server.broadcast(self.base_total)

    def on_client_start(self, engine: RoundEngine, client: ClientRun) -> None:
        payload = engine.round.broadcasts.get(self.key, b"")
        engine.round.downlink += len(payload)
        if engine.remote_client and payload:  # a client process of its own: bring its base up to the server's
            self.apply_broadcast(engine, payload)

    # --- a remote engine's clients hold their own frozen base (Flower) -----------------------------

    def evaluation_broadcast(self, engine: RoundEngine) -> bytes:
        """Server side, after ``end_round``: the cumulative base change as a client receives it (b"" while
        nothing is merged). A client evaluating now (personalised evaluation) applies it first, so it
        evaluates on the base this round's merge produced, as ``fedlight fit``'s shared model does; the
        base it received when it trained lags by this round's merge (more if it sat rounds out)."""
        return engine.server.broadcast(self.base_total) if self.base_total else b""

    def apply_broadcast(self, engine: RoundEngine, payload: bytes) -> None:
        """Client side: add to this process's frozen weights what the broadcast total holds beyond what
        this process has applied so far (a fresh process has applied nothing, so it adds the whole total)."""
        total = engine.client.receive(payload)
        params = dict(engine.module.model.named_parameters())
        with torch.no_grad():
            for name, value in total.items():
                applied = self._applied.get(name)
                change = value if applied is None else value - applied
                params[name].add_(change.to(params[name].device, params[name].dtype))
        self._applied = total

    def on_aggregated(self, engine: RoundEngine, round: RoundState, report: AggregationReport, changed: bool) -> None:
        """The one place frozen base weights change; in place (fp32), so a resumed run continues bit-identically."""
        if not (report.base_delta and changed):
            return
        module = engine.module
        params = dict(module.model.named_parameters())
        with torch.no_grad():
            for name, delta in report.base_delta.items():
                param = params[name]
                if param.requires_grad or delta.shape != param.shape:
                    raise ValueError(f"aggregator base delta {name}: not a frozen weight of shape {tuple(param.shape)}")
                param.add_(delta.to(param.device, param.dtype))
                total = self.base_total.get(name)
                self.base_total[name] = delta.float().clone() if total is None else total + delta.float()
        module.kept_frozen = set(self.base_total)

    def frozen_changes(self) -> State:
        return self.base_total

    def state_dict(self) -> dict[str, Any]:
        return self.base_total

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base_total = dict(state)
