"""The server pipeline: broadcast the global state; decode, validate and aggregate updates.

Every engine (the in-process round, the Flower ServerApp) decodes updates here and only here, so
this is where one bad update is contained: any exception while decoding or validating it becomes a
rejection of that update with its reason, never an exception out of the round. Two default guards
keep a finite but absurd update from destroying the global model: an update whose norm exceeds
``max_norm_over_median`` times the round's median update norm is rejected, and an aggregate that is
not finite is never applied (the round is skipped, the global state unchanged, the reason logged).
"""

from __future__ import annotations

import statistics
import traceback
import warnings
from dataclasses import dataclass, field

import torch

from fedlight.aggregators.base import Aggregator
from fedlight.codecs.base import Codec
from fedlight.core.state import State, global_norm, is_finite
from fedlight.core.update import ClientUpdate, DecodedUpdate
from fedlight.privacy.base import Privacy

#: default of ``federation.max_norm_over_median``: honest updates of one round differ in norm by far
#: less than 100x (different data sizes and local steps), the attacks fedlight evaluates scale by <= 100,
#: and an update of norm 1e30 is a bug or an attack whatever the model
DEFAULT_MAX_NORM_OVER_MEDIAN = 100.0
#: the median guard needs this many updates: with two, the median cannot tell which one is absurd
MIN_UPDATES_FOR_MEDIAN = 3
#: how a rejection caused by an unexpected exception (not a PayloadError/ValueError) starts
INTERNAL_ERROR = "internal error"


def rejection_reason(err: BaseException) -> str:
    """What a rejection logs: the message of a malformed-input error, or, for any other exception (a bug
    in a codec or a check), its type and where it was raised, so that it stays visible."""
    if isinstance(err, ValueError):  # PayloadError and the validation errors: the message says it all
        return str(err)
    frames = traceback.extract_tb(err.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"{INTERNAL_ERROR} while decoding the update: {type(err).__name__}{where}: {err}"


@dataclass
class AggregationReport:
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    uplink_bytes: int = 0
    #: additive changes to frozen base weights from a merging aggregator (``Aggregator.merges_into_base``)
    base_delta: State = field(default_factory=dict)
    #: bytes the server sends beside the broadcast while aggregating (secure aggregation's survivor list)
    downlink_bytes: int = 0
    #: why this round's aggregate was not applied (the global state is unchanged); empty when it was
    skipped: str = ""


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
        if value.dtype != torch.float32:  # deltas are computed (state.subtract), sent and aggregated in fp32
            raise ValueError(f"{name}: dtype {value.dtype}, deltas travel as float32")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name}: contains NaN or Inf")
    if max_norm is not None and (norm := global_norm(delta)) > max_norm:
        raise ValueError(f"update norm {norm:.4g} exceeds federation.max_update_norm ({max_norm})")


class ServerPipeline:
    """Decode, validate, guard and aggregate updates; broadcast the global state.

    ``max_norm_over_median`` (default 100, null disables): with at least 3 valid updates, reject those
    whose L2 norm exceeds this multiple of the round's median update norm. It does not run under a
    privacy plugin that transforms individual updates on the server (``dp_fedavg``: its clipping
    already bounds every update, and a rejection that depends on the other clients' updates would not
    be covered by its sensitivity analysis), nor under secure aggregation (the server sees the sum only).
    """

    def __init__(
        self,
        uplink: Codec,
        downlink: Codec,
        aggregator: Aggregator,
        privacy: Privacy,
        max_update_norm: float | None = None,
        max_norm_over_median: float | None = DEFAULT_MAX_NORM_OVER_MEDIAN,
    ) -> None:
        if max_update_norm is not None and max_update_norm <= 0:
            raise ValueError(f"federation.max_update_norm must be > 0 or null, got {max_update_norm}")
        if max_norm_over_median is not None and not max_norm_over_median > 1:
            raise ValueError(
                f"federation.max_norm_over_median must be > 1 (a multiple of the round's median update norm; "
                f"default {DEFAULT_MAX_NORM_OVER_MEDIAN:g}) or null to disable it, got {max_norm_over_median}"
            )
        self.max_update_norm = max_update_norm
        self.max_norm_over_median = max_norm_over_median
        self.uplink = uplink
        self.downlink = downlink
        self.aggregator = aggregator
        self.privacy = privacy
        #: in-process decode shortcut: id(payload) -> (payload, the tensors it decodes to), see :meth:`remember`
        self._known: dict[int, tuple[bytes, State]] = {}

    def remember(self, payload: bytes, state: State) -> None:
        """``payload`` (built in this process) decodes to ``state`` bit for bit: :meth:`aggregate` skips its decode.

        Only for lossless passthrough encodings (``ClientPipeline.sent_state``); the update is still
        validated and its bytes counted as ``len(payload)``. Keyed by the payload object itself, so a
        payload that arrives from anywhere else (a peer, an attack) is always decoded.
        """
        self._known[id(payload)] = (payload, state)

    def broadcast(self, global_state: State) -> bytes:
        return self.downlink.encode(global_state)

    def aggregate(
        self, global_state: State, updates: list[ClientUpdate], generator: torch.Generator
    ) -> tuple[State, AggregationReport]:
        """New global state; malformed or absurd updates are rejected and reported, never aggregated.

        Never raises because of an update: whatever one payload holds, it ends up accepted or in
        ``report.rejected`` with its reason. An aggregate that is not finite is not applied: the
        global state is returned unchanged, ``report.skipped`` says why and the accepted updates
        are reported as rejected with that reason.
        """
        report = AggregationReport(uplink_bytes=sum(_length(u.payload) for u in updates))
        known, self._known = self._known, {}
        decoded: list[DecodedUpdate] = []
        norms: list[float] = []
        for update in updates:
            try:
                delta = self.decode_update(update, global_state, known)
                norms.append(global_norm(delta))
            except Exception as err:  # noqa: BLE001 - one update must never take the round down
                report.rejected[update.client_id] = rejection_reason(err)
                continue
            decoded.append(DecodedUpdate(update.client_id, update.num_examples, delta))
        decoded = self._median_guard(decoded, norms, report)
        decoded = self.privacy.server_transform(decoded, generator)
        report.accepted = [u.client_id for u in decoded]
        if not decoded:  # the privacy plugin still sees the round (Poisson DP-FedAvg releases noise only)
            return self.privacy.post_aggregate(global_state, global_state, 0, generator), report
        new_global, report.base_delta = self.aggregator.aggregate_with_base(global_state, decoded)
        new_global = self.privacy.post_aggregate(global_state, new_global, len(decoded), generator)
        if problem := _not_finite(new_global, report.base_delta):
            report.skipped = (
                f"round skipped, global state unchanged: the aggregate of {len(decoded)} accepted updates {problem}"
            )
            report.rejected.update({c: report.skipped for c in report.accepted})
            report.accepted, report.base_delta = [], {}
            return global_state, report
        return new_global, report

    def decode_update(
        self, update: ClientUpdate, global_state: State, known: dict[int, tuple[bytes, State]] | None = None
    ) -> State:
        """One update's delta, decoded against the global state and validated; raises if it is unusable."""
        n = update.num_examples
        if type(n) is not int or n < 1:
            raise ValueError(f"num_examples must be a positive integer, got {str(n)[:40]}")
        entry = (known or {}).get(id(update.payload))
        if entry is not None and entry[0] is update.payload:  # built here, lossless: decoding gives these back
            delta = entry[1]
        else:
            delta = self.uplink.decode(update.payload, reference=global_state)
        validate_delta(delta, global_state, self.max_update_norm)
        return delta

    @property
    def median_guard_active(self) -> bool:
        """Whether ``max_norm_over_median`` applies (not under a server-side privacy transform, see the class)."""
        return self.max_norm_over_median is not None and type(self.privacy).server_transform is Privacy.server_transform

    def _median_guard(
        self, decoded: list[DecodedUpdate], norms: list[float], report: AggregationReport
    ) -> list[DecodedUpdate]:
        if self.max_norm_over_median is None or not self.median_guard_active or len(decoded) < MIN_UPDATES_FOR_MEDIAN:
            return decoded
        median = statistics.median(norms)
        if not median > 0:  # most updates are zero: no scale to compare with
            return decoded
        bound = self.max_norm_over_median * median
        kept = []
        for update, norm in zip(decoded, norms, strict=True):
            if norm > bound:
                report.rejected[update.client_id] = (
                    f"update norm {norm:.4g} exceeds {self.max_norm_over_median:g}x the round's median update norm "
                    f"{median:.4g} (federation.max_norm_over_median)"
                )
            else:
                kept.append(update)
        return kept

    def aggregate_secure_sum(
        self, global_state: State, total: State, count: int, num_examples: int, generator: torch.Generator
    ) -> State:
        """New global state from the securely summed deltas of ``count`` clients (secure aggregation).

        No individual update exists here: the aggregator gets one pseudo-update, the mean delta (so
        only ``sum_based`` aggregators are allowed, see ``core.compat.check_secure``), and
        the privacy plugin's ``post_aggregate`` noises the result as in the plain path.
        """
        mean = {k: v / count for k, v in total.items()}
        new_global = self.aggregator.aggregate(global_state, [DecodedUpdate(-1, num_examples, mean)])
        new_global = self.privacy.post_aggregate(global_state, new_global, count, generator)
        if problem := _not_finite(new_global, {}):  # the only guard that can see a masked sum
            warnings.warn(
                f"[fedlight] secure aggregation: the aggregate of {count} updates {problem}; round skipped, "
                "global state unchanged",
                RuntimeWarning,
                stacklevel=2,
            )
            return global_state
        return new_global


def _length(payload: object) -> int:
    return len(payload) if isinstance(payload, (bytes, bytearray, memoryview)) else 0


def _not_finite(new_global: State, base_delta: State) -> str:
    """Why an aggregate must not be applied ('' when it is finite everywhere)."""
    for what, state in (("has", new_global), ("changes the frozen weights by", base_delta)):
        if not is_finite(state):
            bad = next(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
            return f"{what} NaN/Inf values (first in {bad})"
    return ""
