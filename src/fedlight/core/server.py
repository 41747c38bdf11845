"""The server pipeline: broadcast the global state; decode, validate and aggregate updates."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedlight.aggregators.base import Aggregator
from fedlight.codecs.base import Codec
from fedlight.codecs.wire import PayloadError
from fedlight.core.state import State, global_norm
from fedlight.core.update import ClientUpdate, DecodedUpdate
from fedlight.privacy.base import Privacy


@dataclass
class AggregationReport:
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    uplink_bytes: int = 0
    #: additive changes to frozen base weights from a merging aggregator (``Aggregator.merges_into_base``)
    base_delta: State = field(default_factory=dict)


def validate_delta(delta: State, reference: State, max_norm: float | None = None) -> None:
    """Reject an update whose names, shapes or values cannot be aggregated with ``reference``."""
    if list(delta) != list(reference):
        missing = sorted(set(reference) - set(delta))[:5]
        extra = sorted(set(delta) - set(reference))[:5]
        raise ValueError(f"tensor names differ from the global state (missing {missing}, unexpected {extra})")
    for name, value in delta.items():
        if value.shape != reference[name].shape:
            raise ValueError(f"{name}: shape {tuple(value.shape)} != global {tuple(reference[name].shape)}")
        if not value.is_floating_point():
            raise ValueError(f"{name}: dtype {value.dtype} is not floating point")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name}: contains NaN or Inf")
    if max_norm is not None and (norm := global_norm(delta)) > max_norm:
        raise ValueError(f"update norm {norm:.4g} exceeds federation.max_update_norm ({max_norm})")


class ServerPipeline:
    def __init__(
        self, uplink: Codec, downlink: Codec, aggregator: Aggregator, privacy: Privacy, max_update_norm: float | None = None
    ) -> None:
        if max_update_norm is not None and max_update_norm <= 0:
            raise ValueError(f"federation.max_update_norm must be > 0 or null, got {max_update_norm}")
        self.max_update_norm = max_update_norm
        self.uplink = uplink
        self.downlink = downlink
        self.aggregator = aggregator
        self.privacy = privacy

    def broadcast(self, global_state: State) -> bytes:
        return self.downlink.encode(global_state)

    def aggregate(
        self, global_state: State, updates: list[ClientUpdate], generator: torch.Generator
    ) -> tuple[State, AggregationReport]:
        """New global state; malformed updates are rejected and reported, never aggregated."""
        report = AggregationReport(uplink_bytes=sum(u.num_bytes for u in updates))
        decoded: list[DecodedUpdate] = []
        for update in updates:
            try:
                delta = self.uplink.decode(update.payload)
                validate_delta(delta, global_state, self.max_update_norm)
            except (PayloadError, ValueError) as err:
                report.rejected[update.client_id] = str(err)
                continue
            decoded.append(DecodedUpdate(update.client_id, update.num_examples, delta))
        decoded = self.privacy.server_transform(decoded, generator)
        report.accepted = [u.client_id for u in decoded]
        if not decoded:  # the privacy plugin still sees the round (Poisson DP-FedAvg releases noise only)
            return self.privacy.post_aggregate(global_state, global_state, 0, generator), report
        new_global, report.base_delta = self.aggregator.aggregate_with_base(global_state, decoded)
        new_global = self.privacy.post_aggregate(global_state, new_global, len(decoded), generator)
        return new_global, report

    def aggregate_secure_sum(
        self, global_state: State, total: State, count: int, num_examples: int, generator: torch.Generator
    ) -> State:
        """New global state from the securely summed deltas of ``count`` clients (secure aggregation).

        No individual update exists here: the aggregator gets one pseudo-update, the mean delta (so
        only mean-based aggregators are allowed, see ``privacy.secure_round.check_composition``), and
        the privacy plugin's ``post_aggregate`` noises the result as in the plain path.
        """
        mean = {k: v / count for k, v in total.items()}
        new_global = self.aggregator.aggregate(global_state, [DecodedUpdate(-1, num_examples, mean)])
        return self.privacy.post_aggregate(global_state, new_global, count, generator)
