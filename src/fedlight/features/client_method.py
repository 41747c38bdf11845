"""Client methods (FedProx, SCAFFOLD, …) in the round: extra broadcast, gradient correction, extra uplink."""

from __future__ import annotations

from typing import Any

from fedlight.client_methods.base import ClientMethod
from fedlight.core.engine import ClientRun, RoundEngine, RoundState
from fedlight.core.server import AggregationReport
from fedlight.core.state import State
from fedlight.features.base import RoundFeature


class ClientMethodFeature(RoundFeature):
    """Runs a ``client_methods`` plugin at its four points; its extra tensors travel through the codecs and are counted."""

    name = "client_method"
    acts_in_local_training = True

    def __init__(self, method: ClientMethod) -> None:
        self.method = method
        self._payload = b""  # this round's extra broadcast (e.g. SCAFFOLD's c)
        self._uplink: dict[int, bytes] = {}  # its extra uplink per client (e.g. Δc_i)

    def attach(self, engine: RoundEngine) -> None:
        module = engine.module
        shared = set(module.shared_names)
        self._params = {n: p for n, p in module.model.named_parameters() if p.requires_grad and n in shared}
        self.method.bind(list(self._params), engine.population.num_clients)

    def on_round_start(self, engine: RoundEngine, round: RoundState) -> None:
        self._uplink = {}
        extra = self.method.broadcast(engine.global_state)
        self._payload = engine.server.broadcast(extra) if extra else b""  # nothing is sent when there is nothing

    def on_client_start(self, engine: RoundEngine, client: ClientRun) -> None:
        received = engine.client.receive(self._payload) if self._payload else {}
        engine.round.downlink += len(self._payload)
        self.method.start_client(client.client_id, client.start, received, engine.client_store.get(client.client_id, {}))

    def on_gradients(self, engine: RoundEngine, client: ClientRun, lr: float) -> None:
        self.method.correct_gradients(self._params, lr)

    def on_client_end(self, engine: RoundEngine, client: ClientRun, trained: State) -> None:
        store = engine.client_store.setdefault(client.client_id, {})
        extra = self.method.finish_client(client.client_id, client.start, trained, store)
        if extra:
            payload = engine.client.uplink.encode(extra)
            self._uplink[client.client_id] = payload
            engine.round.extra_uplink += len(payload)

    def on_aggregated(self, engine: RoundEngine, round: RoundState, report: AggregationReport, changed: bool) -> None:
        if changed:  # the method's server state moves with accepted updates only
            decode = engine.client.uplink.decode
            self.method.server_update([(c, decode(self._uplink[c])) for c in report.accepted if c in self._uplink])

    def state_dict(self) -> dict[str, Any]:
        return self.method.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state)
