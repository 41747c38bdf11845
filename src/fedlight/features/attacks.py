"""Malicious clients: a fixed, seeded set of clients that run an attack plugin (for evaluating defences)."""

from __future__ import annotations

from typing import Any

from fedlight.attacks.base import Attack
from fedlight.core.engine import ClientRun, RoundEngine, RoundState
from fedlight.core.seeds import Purpose, Stream, run_rng
from fedlight.core.state import State, add, subtract
from fedlight.features.base import RoundFeature


class MaliciousClients(RoundFeature):
    """A seeded fraction of all clients poisons its batches and, colluding, crafts its updates at round end."""

    name = "malicious_clients"
    acts_in_local_training = True

    def __init__(self, attack: Attack, fraction: float) -> None:
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"federation.malicious_fraction must be in (0, 1) with an attack, got {fraction}")
        self.attack = attack
        self.fraction = fraction
        self.malicious: frozenset[int] = frozenset()
        self._held: list[tuple[int, State, State]] = []  # (client, start, trained) of this round

    def bind(self, engine: RoundEngine) -> None:
        n = engine.population.num_clients
        order = run_rng(engine.seed, Purpose.MALICIOUS).permutation(n)
        self.malicious = frozenset(int(c) for c in order[: round(self.fraction * n)])

    def on_round_start(self, engine: RoundEngine, round: RoundState) -> None:
        self._held = []

    def on_batch(self, engine: RoundEngine, client: ClientRun, batch: dict[str, Any]) -> None:
        if client.client_id in self.malicious:
            batch.update(self.attack.poison_batch(batch, engine.module.num_classes))

    def hold_update(self, engine: RoundEngine, client: ClientRun, trained: State) -> bool:
        if client.client_id not in self.malicious:
            return False
        self._held.append((client.client_id, client.start, trained))  # attackers collude at round end
        return True

    def round_part(self, engine: RoundEngine, round: RoundState) -> Any:
        return self._held

    def merge_round_parts(self, engine: RoundEngine, round: RoundState, parts: list[Any]) -> None:
        position = {c: i for i, c in enumerate(round.plan.training)}
        self._held = sorted((h for part in parts for h in part), key=lambda h: position[h[0]])

    def before_aggregate(self, engine: RoundEngine, round: RoundState) -> None:
        if not self._held:
            return
        honest = [subtract(trained, start) for _, start, trained in self._held]
        expected = len(round.updates) + len(honest)
        poisoned = self.attack.poison_updates(honest, expected, engine.generator(Stream.ATTACK))
        for (client_id, start, _), delta in zip(self._held, poisoned, strict=True):
            engine.send(client_id, start, add(start, delta), {"malicious": 1.0})
        self._held = []
