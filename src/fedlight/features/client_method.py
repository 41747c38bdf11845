"""Client methods (FedProx, SCAFFOLD, …) in the round: extra broadcast, gradient correction, extra uplink."""

from __future__ import annotations

from typing import Any

from fedlight.client_methods.base import ClientMethod
from fedlight.core.engine import ClientRun, RoundEngine, RoundState
from fedlight.core.server import AggregationReport
from fedlight.core.state import State
from fedlight.core.update import ClientUpdate
from fedlight.features.base import RoundFeature


class ClientMethodFeature(RoundFeature):
    """Runs a ``client_methods`` plugin at its four points; its extra tensors travel through the codecs and are counted."""

    name = "client_method"
    acts_in_local_training = True
    groupable = False  # the client method holds the current client's anchor / controls between steps

    def __init__(self, method: ClientMethod) -> None:
        self.method = method
        self._extras: dict[int, State] = {}  # this round's decoded extras of the updates that passed screening

    def attach(self, engine: RoundEngine) -> None:
        module = engine.module
        shared = set(module.shared_names)
        self._params = {n: p for n, p in module.model.named_parameters() if p.requires_grad and n in shared}
        self.method.bind(list(self._params), engine.population.num_clients)

    def on_round_start(self, engine: RoundEngine, round: RoundState) -> None:
        extra = self.method.broadcast(engine.global_state)
        if extra:  # nothing is sent when there is nothing extra (e.g. FedProx)
            round.broadcasts[self.key] = engine.server.broadcast(extra)

    def on_client_start(self, engine: RoundEngine, client: ClientRun) -> None:
        payload = engine.round.broadcasts.get(self.key, b"")
        received = engine.client.receive(payload) if payload else {}
        engine.round.downlink += len(payload)
        self.method.start_client(
            client.client_id, client.start, received, engine.client_store.get(client.client_id, {})
        )

    def on_gradients(self, engine: RoundEngine, client: ClientRun, lr: float) -> None:
        self.method.correct_gradients(self._params, lr)

    def on_client_end(
        self, engine: RoundEngine, client: ClientRun, trained: State, update: ClientUpdate | None
    ) -> None:
        store = engine.client_store.setdefault(client.client_id, {})
        extra = self.method.finish_client(client.client_id, client.start, trained, store)
        if extra and update is not None:
            update.extras[self.key] = engine.client.uplink.encode(extra)

    def screen(self, engine: RoundEngine, round: RoundState) -> None:
        """Decode every update's extras against the shared tensors' shapes; an update whose extras do not
        decode is refused (its model delta is not aggregated either)."""
        self._extras = {}
        reference = {n: engine.global_state[n] for n in self._params}  # what a client's extras must be shaped like
        for update in list(round.updates):
            payload = update.extras.get(self.key)
            if payload is None:
                continue
            try:
                self._extras[update.client_id] = engine.client.uplink.decode(payload, reference=reference)
            except Exception as err:  # noqa: BLE001 - one client's extras must never take the round down
                round.updates.remove(update)
                round.rejected[update.client_id] = f"client_method {self.method.name!r} extras: {err}"

    def on_aggregated(self, engine: RoundEngine, round: RoundState, report: AggregationReport, changed: bool) -> None:
        if changed:  # the method's server state moves with accepted updates only
            self.method.server_update([(c, self._extras[c]) for c in report.accepted if c in self._extras])

    def state_dict(self) -> dict[str, Any]:
        return self.method.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state)
