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
