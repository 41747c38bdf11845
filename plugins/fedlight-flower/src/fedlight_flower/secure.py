"""Secure aggregation over Flower messages: each client's SecAgg party and secrets live on its own node.

fedlight's SecAgg (``fedlight.privacy.secure_round``) simulates every client's party in one process.
Here the ServerApp runs only the server's party (:class:`FlowerSecureRound`, built by the engine's secure
client pipeline at ``begin_round`` through ``SecureSession.make_round``) and each step is a message:

* ``query.secagg_keys``   server -> each client that trains: create the party, reply its two public keys;
* ``query.secagg_shares`` server -> each client that advertised: the roster; reply the encrypted share
  bundles (Shamir shares of its mask seed and key, one per peer, opaque to the server);
* ``train``               carries the bundles routed to the client and the share-holding set U1; the
  client trains and its pipeline sends only the masked ring vector;
* ``query.secagg_mask``   (with an attack only) server -> a malicious client whose update it held back:
  the update the server's attack feature crafted for it (colluding attackers, coordinated by the
  ServerApp, as in ``fedlight fit``) and U1; the client masks it with its own party, as its ``train``
  reply would have been, and replies the masked vector. A node masks at most one input per round, and
  only when it held its own update back this round (masking a second vector would reveal the first);
* ``query.secagg_unmask`` server -> each survivor: the survivor list; reply the shares to reveal.

Between messages a client's party is in its node's ``Context.state`` (``fedlight.secagg``, a ConfigRecord):
a deployed SuperNode runs every message in a fresh process. The server's code path holds only public
keys, ciphertexts, masked vectors and the revealed shares it needs, and unmasks only the sum.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, RecordDict

from fedlight.core.server import AggregationReport
from fedlight.core.state import State
from fedlight.core.update import ClientUpdate
from fedlight.privacy.secure_agg import SecAggClient
from fedlight.privacy.secure_round import SecureRound

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from fedlight_flower.job import FedlightJob

STATE_KEY = "fedlight.secagg"  # the client's party, in its Context.state
HELD_KEY = "fedlight.secagg.held"  # Context.state: this round's update was held back (the mask step may run)
DELTA_RECORD = "fedlight.secagg.delta"  # secagg_mask request: the crafted update (fp32 arrays)
RECORD = "fedlight.secagg"  # protocol payloads in requests and replies
SHARE_LEN = 66  # one GF(2^521 - 1) element


def _info(client_id: int) -> ConfigRecord:
    return ConfigRecord({"client-id": client_id})


def _bytes_list(values: Any, what: str, length: int | None = None) -> list[bytes]:
    if not isinstance(values, list) or not all(isinstance(v, bytes) for v in values):
        raise ValueError(f"{what}: not a list of bytes")
    if length is not None and any(len(v) != length for v in values):
        raise ValueError(f"{what}: not {length}-byte values")
    return list(values)


def _ids(values: Any, what: str, allowed: set[int]) -> list[int]:
    if not isinstance(values, list) or not all(type(v) is int and v in allowed for v in values):
        raise ValueError(f"{what}: not a list of client ids of this round")
    if len(set(values)) != len(values):
        raise ValueError(f"{what}: repeated client ids")
    return list(values)


class Unrevealed(ValueError):
    """Too few usable share reveals to unmask the sum: the round reveals nothing."""


class FlowerSecureRound(SecureRound):
    """The server's party of one SecAgg round; steps 0-1 and the reveal are messages to the clients."""

    def __init__(
        self, grid: Grid, job: FedlightJob, node_of: dict[int, int], timeout: float, *args: Any, **kwargs: Any
    ) -> None:
        self.grid, self.job, self.node_of, self.timeout = grid, job, node_of, timeout
        super().__init__(*args, **kwargs, simulate=False)
        self.round_idx = job.engine.round.round  # begin_round planned the round before the pipeline's set-up
        #: crafted updates whose attacker's node did not mask them: client id -> why (the round's ``failed``)
        self.unmasked: dict[int, str] = {}
        if self.failure is None:
            self.exchange_keys(self._advertise, self._share)

    def _ask(
        self,
        clients: list[int],
        action: str,
        payload: dict[int, dict],
        read: Any,
        records: dict[str, Any] | None = None,
    ) -> dict[int, Any]:
        from fedlight_flower.apps import _log, ask

        requests = {
            c: {
                RECORD: ConfigRecord({"round": self.round_idx, "client-id": c, **payload.get(c, {})}),
                **(records or {}),
            }
            for c in clients
        }
        answers, refused = ask(
            self.grid, self.job, self.node_of, self.round_idx, requests, f"query.{action}", read, self.timeout
        )
        for who, reason in refused.items():
            _log(f"round {self.round_idx}: secure aggregation {action}: {who}: {reason}")
        return answers

    def _advertise(self) -> dict[int, tuple[bytes, bytes]]:
        def read(content: RecordDict) -> tuple[bytes, bytes]:
            pk_c, pk_s = _bytes_list(content.config_records[RECORD]["keys"], "keys", 32)
            return pk_c, pk_s

        setup = {c: {"threshold": self.threshold, "session": self.server.session} for c in self.participants}
        return self._ask(self.participants, "secagg_keys", setup, read)

    def _share(self, roster: dict[int, tuple[bytes, bytes]]) -> dict[int, dict[int, bytes]]:
        ids = sorted(roster)
        payload = {"roster": ids, "roster-c": [roster[v][0] for v in ids], "roster-s": [roster[v][1] for v in ids]}

        def read(content: RecordDict) -> dict[int, bytes]:
            record = content.config_records[RECORD]
            to = _ids(record["to"], "to", set(ids))
            return dict(zip(to, _bytes_list(record["bundles"], "bundles"), strict=True))

        return self._ask(ids, "secagg_shares", dict.fromkeys(ids, payload), read)

    def train_request(self, client_id: int) -> dict[str, Any]:
        """What the ``train`` message adds for ``client_id``: the bundles routed to it and U1 (empty when the
        round failed before masking: the client's pipeline then sends nothing, as in-process)."""
        routed = self.server.bundles_for(client_id) if self.failure is None else {}
        u1 = list(self.server.u1) if self.failure is None else []
        return {"from": sorted(routed), "bundles": [routed[v] for v in sorted(routed)], "u1": u1}

    def client_update(
        self, client_id: int, delta: State, num_examples: int, metrics: dict[str, float]
    ) -> ClientUpdate | None:
        """Server side, a late send (the attack feature's ``before_aggregate``): the update crafted for a
        malicious client goes to that client's node to be masked with its own party (``secagg_mask``), since
        this process holds no client's secrets. None, as a client that sends nothing, when the round failed,
        the client is not in U1, its node refuses or does not answer, or the update is not finite."""
        if self.failure is not None or client_id not in self.server.u1:
            return None
        from fedlight_flower.apps import state_to_record

        def read(content: RecordDict) -> bytes:
            masked = content.config_records[RECORD].get("masked", b"")  # absent: not finite, not sent
            if not isinstance(masked, bytes) or len(masked) not in (0, 4 * self.dim):
                raise ValueError(f"masked: not {4 * self.dim} bytes")
            return masked

        request: dict[str, Any] = {"u1": list(self.server.u1)}
        if self.clip_norm is not None:  # the bound the server's quantizer was built for (an adaptive clip moves)
            request["clip-norm"] = float(self.clip_norm)
        answers = self._ask(
            [client_id], "secagg_mask", {client_id: request}, read, {DELTA_RECORD: state_to_record(delta)}
        )
        masked = answers.get(client_id)
        if masked is None:  # the pipeline's own refusal text assumes a non-finite update; say what happened
            self.unmasked[client_id] = "secure aggregation: its node did not mask the crafted update (see the log)"
        return ClientUpdate(client_id, num_examples, masked, dict(metrics)) if masked else None

    def reveal(self, survivors: list[int]) -> dict[int, dict[str, dict[int, int]]]:
        u1 = set(self.server.u1)

        def read(content: RecordDict) -> dict[str, dict[int, int]]:
            record = content.config_records[RECORD]
            out = {}
            for kind in ("b", "s"):
                ids = _ids(record.get(f"{kind}-ids", []), f"{kind}-ids", u1)
                shares = _bytes_list(record.get(f"{kind}-shares", []), f"{kind}-shares", SHARE_LEN)
                out[kind] = {u: int.from_bytes(x, "big") for u, x in zip(ids, shares, strict=True)}
            if set(out["b"]) & set(out["s"]):
                raise ValueError("revealed both shares of one client")  # would unmask an individual input
            return out

        answers = self._ask(survivors, "secagg_unmask", dict.fromkeys(survivors, {"survivors": survivors}), read)
        dropped = [u for u in self.server.u1 if u not in self.server.masked]
        short = [u for u in survivors if sum(u in r["b"] for r in answers.values()) < self.threshold]
        short += [u for u in dropped if sum(u in r["s"] for r in answers.values()) < self.threshold]
        if short:  # Shamir with fewer than t shares gives a wrong seed: the sum would be garbage
            raise Unrevealed(
                f"{len(answers)} of {len(survivors)} survivors revealed usable shares; fewer than the threshold "
                f"{self.threshold} for clients {short[:5]}: not unmasked"
            )
        return answers

    def aggregate(self, server: Any, global_state: Any, updates: list, generator: Any) -> tuple[Any, AggregationReport]:
        """As in-process; a round whose reveal falls short unmasks nothing (every survivor rejected)."""
        try:
            return super().aggregate(server, global_state, updates, generator)
        except Unrevealed as err:
            report = AggregationReport(uplink_bytes=sum(u.num_bytes for u in updates) + self.uplink_overhead)
            report.rejected.update({c: str(err) for c in self.server.survivors})
            return global_state, report


# --- client side -------------------------------------------------------------------------------------


def _save(context: Context, party: SecAggClient) -> None:
    context.state[STATE_KEY] = ConfigRecord(party.to_state())


def _load(context: Context, client_id: int) -> SecAggClient:
    if STATE_KEY not in context.state.config_records:
        raise RuntimeError("no secure-aggregation party on this node for this round (keys step missing)")
    party = SecAggClient.from_state(dict(context.state.config_records[STATE_KEY].items()))
    if party.id != client_id:
        raise RuntimeError(f"this node's secure-aggregation party is client {party.id}, not {client_id}")
    return party


def client_step(action: str, content: RecordDict, context: Context, client_id: int) -> RecordDict:
    """One SecAgg step on the client (``secagg_keys`` / ``secagg_shares`` / ``secagg_unmask``)."""
    cfg = content.config_records[RECORD]
    if action == "secagg_keys":
        party = SecAggClient(client_id, int(cfg["threshold"]), bytes(cfg["session"]))
        reply = {"keys": list(party.advertise())}
    elif action == "secagg_shares":
        party = _load(context, client_id)
        roster = dict(zip(cfg["roster"], zip(cfg["roster-c"], cfg["roster-s"], strict=True), strict=True))
        bundles = party.share_keys({int(v): (bytes(c), bytes(s)) for v, (c, s) in roster.items()})
        reply = {"to": sorted(bundles), "bundles": [bundles[v] for v in sorted(bundles)]}
    elif action == "secagg_unmask":
        party = _load(context, client_id)
        reveals = party.unmask([int(v) for v in cfg["survivors"]])
        reply = {}
        for kind in ("b", "s"):
            if reveals[kind]:
                reply[f"{kind}-ids"] = sorted(reveals[kind])
                reply[f"{kind}-shares"] = [reveals[kind][u].to_bytes(SHARE_LEN, "big") for u in sorted(reveals[kind])]
    else:
        raise ValueError(f"unknown secure-aggregation step {action!r}")
    _save(context, party)
    return RecordDict({RECORD: ConfigRecord(reply), "fedlight.info": _info(client_id)})


def client_round(job: FedlightJob, content: RecordDict, context: Context, client_id: int, round_idx: int) -> str:
    """Before local training: this client's view of the round (its party, the routed bundles, U1) becomes
    the secure client pipeline's round, so its ``finish`` sends only the masked vector. Returns why the
    client cannot take part ('' when it can)."""
    engine = job.engine
    cfg = content.config_records[RECORD]
    party = _load(context, client_id)
    party.receive_shares({int(v): bytes(b) for v, b in zip(cfg.get("from", []), cfg.get("bundles", []), strict=True)})
    pipeline = engine.client
    u1 = [int(v) for v in cfg["u1"]]
    if u1 and client_id not in u1:
        return f"secure aggregation: client {client_id} is not in this round's share-holding set U1; it cannot mask"
    secure = SecureRound(
        pipeline.session.config, engine.global_state, u1, party.session,
        pipeline.privacy.secure_clip_norm(), engine.schedule.clients_per_round, simulate=False,
    )  # fmt: skip
    secure.join(party, u1)
    pipeline.session.round = secure
    job.secure_party = (context, party)
    return ""


def after_training(job: FedlightJob, held: bool = False) -> None:
    """Keep the party (now holding its masked set) for the unmask step; ``held``: a feature held this
    client's update back (a malicious client), so the server may send it its crafted update to mask."""
    secure_party = getattr(job, "secure_party", None)
    if secure_party is not None:
        context, party = secure_party
        _save(context, party)
        if held:
            context.state[HELD_KEY] = ConfigRecord({"round": job.engine.round.round, "client-id": party.id})
        elif HELD_KEY in context.state.config_records:
            del context.state[HELD_KEY]
        job.secure_party = None


def client_mask(job: FedlightJob, content: RecordDict, context: Context, client_id: int) -> RecordDict:
    """``secagg_mask`` on the client: mask the update the server crafted for it (a malicious client whose
    training reply held its update back), with its own party, as its ``train`` reply would have been."""
    from fedlight_flower.apps import record_to_state
    from fedlight_flower.job import dtype_like

    cfg = content.config_records[RECORD]
    round_idx = int(cfg["round"])
    marker = context.state.config_records.get(HELD_KEY)
    if marker is None or int(marker["round"]) != round_idx or int(marker["client-id"]) != client_id:
        raise RuntimeError(f"client {client_id} did not hold its update back in round {round_idx}: nothing to mask")
    party = _load(context, client_id)
    if "masked-set" in party.to_state():  # a second masked vector with the same masks reveals the first
        raise RuntimeError(f"client {client_id}'s secure-aggregation party already masked an input this round")
    del context.state[HELD_KEY]  # once per round
    delta = dtype_like(record_to_state(content.array_records[DELTA_RECORD], job.shared_names), job.module)
    pipeline, u1 = job.engine.client, [int(v) for v in cfg["u1"]]
    clip = float(cfg["clip-norm"]) if "clip-norm" in cfg else None
    secure = SecureRound(
        pipeline.session.config, delta, u1, party.session, clip, job.engine.schedule.clients_per_round, simulate=False
    )
    secure.join(party, u1)
    update = secure.client_update(client_id, delta, 0, {})
    _save(context, party)  # its masked set, for the unmask step
    reply = {"masked": update.payload} if update is not None else {}
    return RecordDict({RECORD: ConfigRecord(reply), "fedlight.info": _info(client_id)})
