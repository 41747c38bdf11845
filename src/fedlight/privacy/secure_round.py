"""Secure aggregation in real runs: the ``federation.secure_aggregation`` section and one round of SecAgg.

The protocol objects are those of :mod:`fedlight.privacy.secure_agg`. Per round:

* round start: every client that will train (the round plan's ``training``) advertises keys and
  shares its secrets (steps 0-1); this is the share-holding set U1. Clients that drop before
  training never join.
* client end: the client-side path takes the privacy plugin's ``client_transform``, checks the
  update is finite (the server cannot: a non-finite update is *not sent*, the client counts as
  failed), clips it to the privacy plugin's bound if it has one (the server cannot clip either),
  quantises it and sends only the masked ring vector ``y_u`` as its payload.
* round end: the server-side path parses payloads (length is the only check it can make), sums the
  masked vectors, asks the survivors for shares, and unmasks the **sum**; clients that dropped after
  masking (``faults.dropout_after``, stragglers dropped at the deadline, crashed clients) are removed
  through Shamir reconstruction of their mask keys. The aggregator sees one pseudo-update, the mean
  of the survivors' deltas, and the privacy plugin's ``post_aggregate`` adds its central noise to it.

Bytes: ``uplink`` counts the masked payloads (4 bytes per trainable element per survivor), plus the
key advertisements (64 B), the encrypted share bundles and the revealed shares (70 B each: 4 B id +
66 B field element); ``downlink`` adds the roster, the routed bundles and the survivor list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from fedlight.core.server import AggregationReport, ServerPipeline
from fedlight.core.state import State, is_finite
from fedlight.core.update import ClientUpdate
from fedlight.privacy.dp_fedavg import clip_state
from fedlight.privacy.secure_agg import RING, RING_BITS, Quantizer, SecAggClient, SecAggServer

SHARE_BYTES = 4 + 66  # recipient/owner id + one GF(2^521 - 1) element


@dataclass
class SecureAggregation:
    """The ``federation.secure_aggregation`` section: pairwise-masked SecAgg (Bonawitz et al. 2017; Bell et al. 2020).

    Args:
        threshold: fraction of the clients that shared keys in a round whose shares are needed to
            unmask (Shamir threshold t = max(2, ceil(threshold * |U1|))); a round with fewer
            survivors fails (no update is revealed) and is handled like a round with too few clients.
        clip: per-coordinate range of the fixed-point encoding; coordinates beyond it are clamped
            on the client. Null: the privacy plugin's client-side L2 bound C (no coordinate can
            exceed it), else 1.0.
        scale: fixed-point scale; null picks the largest power of two for which the sum of
            ``clients_per_round`` inputs cannot overflow the signed 32-bit ring.
    """

    threshold: float = 0.5
    clip: float | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"federation.secure_aggregation.threshold must be in (0, 1], got {self.threshold}")
        if self.clip is not None and not (self.clip > 0 and math.isfinite(self.clip)):
            raise ValueError(f"federation.secure_aggregation.clip must be > 0 or null, got {self.clip}")
        if self.scale is not None and not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"federation.secure_aggregation.scale must be > 0 or null, got {self.scale}")

    def quantizer(self, clip_norm: float | None, max_clients: int) -> Quantizer:
        clip = self.clip if self.clip is not None else (clip_norm if clip_norm is not None else 1.0)
        scale = self.scale
        if scale is None:
            limit = 2 ** (RING_BITS - 1) / max_clients - 1
            scale = 2.0 ** math.floor(math.log2(max(limit, 1.0) / clip))
        try:
            return Quantizer(clip=clip, scale=scale, max_clients=max_clients)
        except ValueError as err:
            raise ValueError(f"federation.secure_aggregation: {err}") from None


def _flatten(state: State) -> np.ndarray:
    return (
        np.concatenate([v.detach().reshape(-1).double().cpu().numpy() for v in state.values()])
        if state
        else np.zeros(0)
    )


def _unflatten(vector: np.ndarray, template: State) -> State:
    out, pos = {}, 0
    for k, v in template.items():
        n = v.numel()
        out[k] = torch.from_numpy(vector[pos : pos + n].astype(np.float32)).reshape(v.shape)
        pos += n
    return out


class SecureRound:
    """One round of secure aggregation over the clients that train in it (simulated in-process).

    The client-side objects (``SecAggClient``, their inputs) live in ``_clients`` and are used only
    by :meth:`client_update` and the share reveal; :meth:`aggregate` is the server path: it touches
    only ``ClientUpdate`` payloads (masked vectors) and the ``SecAggServer``.
    """

    def __init__(
        self,
        config: SecureAggregation,
        template: State,
        participants: list[int],
        session: bytes,
        clip_norm: float | None,
        max_clients: int,
        simulate: bool = True,
    ) -> None:
        """``simulate``: run steps 0-1 here with every client's party in this process (``fedlight fit``);
        False: a remote engine runs them as messages (:meth:`exchange_keys`) and each client keeps its secrets."""
        self.template = {k: v.detach() for k, v in template.items()}
        self.dim = sum(v.numel() for v in template.values())
        self.quantizer = config.quantizer(clip_norm, max_clients)
        self.clip_norm = clip_norm
        if clip_norm is not None:  # rounding to the grid moves the norm by at most sqrt(d) / (2 scale)
            self.client_clip = clip_norm - math.sqrt(self.dim) / (2 * self.quantizer.scale)
            if self.client_clip <= 0:
                raise ValueError("federation.secure_aggregation.scale is too small for the clip norm; raise it")
        self.participants = sorted(participants)
        self.threshold = max(2, math.ceil(config.threshold * len(self.participants)))
        self.server = SecAggServer(self.threshold, self.dim, session)
        self.uplink_overhead = 0
        self.downlink_overhead = 0  # key set-up, sent before training
        self.late_downlink = 0  # the survivor list, sent at unmasking
        self.failure: str | None = None
        self._clients = {i: SecAggClient(i, self.threshold, session) for i in self.participants} if simulate else {}
        if len(self.participants) < self.threshold:
            self.failure = f"{len(self.participants)} clients joined, fewer than the threshold {self.threshold}"
            self._clients = {}
            return
        if simulate:
            self.exchange_keys(
                lambda: {i: c.advertise() for i, c in self._clients.items()},
                lambda roster: {i: c.share_keys(roster) for i, c in self._clients.items()},
            )
            for i, c in self._clients.items():
                c.receive_shares(self.server.bundles_for(i))

    def exchange_keys(self, advertise: Any, share: Any) -> None:
        """Steps 0-1 through the server: ``advertise()`` -> {client: public keys}, ``share(roster)`` ->
        {client: {recipient: encrypted bundle}}; counts their bytes. The bundles for each client are then
        ``server.bundles_for(client)`` (sent with its training request)."""
        for i, keys in advertise().items():  # step 0: advertise keys
            self.server.receive_keys(i, keys)
            self.uplink_overhead += 64
        roster = self.server.roster
        for i, bundles in share(roster).items():  # step 1: share keys, routed through the server
            self.downlink_overhead += 64 * (len(roster) - 1)
            self.uplink_overhead += sum(len(ct) for ct in bundles.values())
            self.server.receive_bundles(i, bundles)
        for i in sorted(self.server.u1):
            self.downlink_overhead += sum(len(ct) for ct in self.server.bundles_for(i).values())

    # --- client side --------------------------------------------------------------------------------

    def join(self, party: SecAggClient, u1: list[int]) -> None:
        """A remote client's round (``simulate=False``): its own party (secrets, shares it received) and the
        share-holding set U1 the server announced; :meth:`client_update` then masks with them."""
        self._clients = {party.id: party}
        self.server.u1 = sorted(u1)

    def client_update(
        self, client_id: int, delta: State, num_examples: int, metrics: dict[str, float]
    ) -> ClientUpdate | None:
        """The masked payload of one client, or None when the client refuses to send (non-finite update)."""
        if self.failure is not None or client_id not in self._clients:
            return None
        if not is_finite(delta):
            return None
        if self.clip_norm is not None:
            delta, _ = clip_state(delta, self.client_clip)
        x = _flatten(delta)
        clamped = int(np.sum(np.abs(x) > self.quantizer.clip))
        if clamped:
            rank_zero_warn(
                f"[fedlight] secure aggregation: client {client_id} clamped {clamped} coordinates to "
                f"+-{self.quantizer.clip} (raise federation.secure_aggregation.clip)"
            )
        y = self._clients[client_id].masked_input(self.quantizer.encode(x), self.server.u1)
        return ClientUpdate(client_id, num_examples, y.astype("<u4").tobytes(), dict(metrics))

    # --- server side ---------------------------------------------------------------------------------

    def aggregate(
        self, server: ServerPipeline, global_state: State, updates: list[ClientUpdate], generator: torch.Generator
    ) -> tuple[State, AggregationReport]:
        """New global state from the unmasked sum; individual payloads are only ever masked vectors."""
        report = AggregationReport(uplink_bytes=sum(u.num_bytes for u in updates) + self.uplink_overhead)
        if self.failure is not None:
            report.rejected.update({c: self.failure for c in self.participants})
            return global_state, report
        examples = 0
        for update in updates:
            if update.num_bytes != 4 * self.dim:
                report.rejected[update.client_id] = (
                    f"masked payload of {update.num_bytes} bytes, expected {4 * self.dim}"
                )
                continue
            try:
                self.server.receive_masked(update.client_id, np.frombuffer(update.payload, dtype="<u4").astype(RING))
            except ValueError as err:
                report.rejected[update.client_id] = str(err)
                continue
            examples += update.num_examples
        survivors = self.server.survivors
        if len(survivors) < self.threshold:
            reason = (
                f"only {len(survivors)} masked updates arrived, fewer than the threshold {self.threshold}: not unmasked"
            )
            report.rejected.update({c: reason for c in survivors})
            return global_state, report
        self.late_downlink += 4 * len(survivors) * len(survivors)  # the survivor list, to each survivor
        reveals = self.reveal(survivors)  # client side answers
        self.uplink_overhead += sum(SHARE_BYTES * (len(r["b"]) + len(r["s"])) for r in reveals.values())
        report.uplink_bytes += sum(SHARE_BYTES * (len(r["b"]) + len(r["s"])) for r in reveals.values())
        total = _unflatten(self.quantizer.decode_sum(self.server.finish(reveals)), self.template)
        report.accepted = list(survivors)
        new_global = server.aggregate_secure_sum(global_state, total, len(survivors), examples, generator)
        return new_global, report

    def reveal(self, survivors: list[int]) -> dict[int, dict[str, dict[int, int]]]:
        """Step 3: each survivor's shares to reveal (a remote engine asks its clients by message)."""
        return {v: self._clients[v].unmask(survivors) for v in survivors}
