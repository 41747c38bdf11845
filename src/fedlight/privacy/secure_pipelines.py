"""Secure aggregation as pipeline variants: the engine runs them like the plain pipelines, with no mode forks.

Both variants share one :class:`SecureRound` per round (the protocol is simulated in one process):
the client variant sets it up at round start (key advertisement and share exchange among the
clients that train) and turns each client's delta into a masked ring vector; the server variant
only ever touches those masked payloads and their unmasked *sum*.
"""

from __future__ import annotations

from typing import Any

import torch

from fedlight.core.client import ClientPipeline, ClientState
from fedlight.core.server import AggregationReport, ServerPipeline
from fedlight.core.state import State, subtract
from fedlight.core.update import ClientUpdate
from fedlight.privacy.secure_round import SecureAggregation, SecureRound


class SecureSession:
    """The round's protocol state, shared by the two variants (never checkpointed)."""

    def __init__(self, config: SecureAggregation) -> None:
        self.config = config
        self.round: SecureRound | None = None
        #: builds the round instead of :class:`SecureRound` (same arguments): a remote engine whose
        #: clients keep their own secrets runs the key exchange as messages (fedlight-flower)
        self.make_round: Any = SecureRound

    def current(self) -> SecureRound:
        """This round's protocol state (the client variant's ``begin_round`` sets it up)."""
        assert self.round is not None, "the client begin_round runs before finish and aggregate"
        return self.round


class SecureClientPipeline(ClientPipeline):
    """Client side: privacy transform, client-side checks and clipping, then only a masked vector leaves."""

    def __init__(self, session: SecureSession, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.session = session

    def begin_round(self, engine: Any, round: Any) -> None:
        session = f"{engine.seed}/{round.plan.round}".encode()
        self.session.round = self.session.make_round(
            self.session.config, engine.global_state, list(round.plan.training), session,
            self.privacy.secure_clip_norm(), engine.schedule.clients_per_round,
        )  # fmt: skip
        round.downlink += self.session.round.downlink_overhead

    def finish(
        self,
        client_id: int,
        start: State,
        trained: State,
        num_examples: int,
        generator: torch.Generator,
        client_state: ClientState,
        metrics: dict[str, float] | None = None,
    ) -> ClientUpdate | None:
        secure = self.session.current()
        delta = self.privacy.client_transform(subtract(trained, start), generator)
        update = secure.client_update(client_id, delta, num_examples, dict(metrics or {}))
        self.refusal = None
        if update is None and secure.failure is None:
            self.refusal = "update not sent: NaN/Inf values (checked on the client under secure aggregation)"
        return update


class SecureServerPipeline(ServerPipeline):
    """Server side: sums masked vectors, unmasks only the sum, aggregates one mean pseudo-update."""

    def __init__(self, session: SecureSession, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.session = session

    def aggregate(
        self, global_state: State, updates: list[ClientUpdate], generator: torch.Generator
    ) -> tuple[State, AggregationReport]:
        secure = self.session.current()
        new_global, report = secure.aggregate(self, global_state, updates, generator)
        report.downlink_bytes += secure.late_downlink
        return new_global, report


def secure_pipelines(options: Any) -> tuple[ClientPipeline, ServerPipeline]:
    session = SecureSession(options.secure_aggregation)
    client = SecureClientPipeline(session, options.uplink_codec, options.downlink_codec, options.privacy)
    server = SecureServerPipeline(
        session, options.uplink_codec, options.downlink_codec, options.aggregator, options.privacy,
        options.max_update_norm, options.max_norm_over_median,
    )  # fmt: skip
    return client, server
