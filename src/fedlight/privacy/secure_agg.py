"""Pairwise-masked secure aggregation (Bonawitz et al. 2017 "Practical Secure Aggregation"; Bell et al. 2020 SecAgg+).

Engine-independent protocol objects: :class:`SecAggClient` (one per client) and
:class:`SecAggServer`. The server only ever holds public keys, encrypted share bundles it routes
but cannot read, masked vectors, the shares that survivors choose to reveal, and the final sum.

Protocol (complete graph, as in SecAgg; SecAgg+ would restrict pairs to a sparse random graph):

0. advertise: client u makes two X25519 key pairs, ``c`` (to encrypt shares) and ``s`` (to mask).
1. share: u draws a self-mask seed ``b_u``, Shamir-shares ``b_u`` and its ``s`` secret key with
   threshold ``t`` and sends share ``j`` to client ``v`` encrypted with AES-GCM under
   HKDF(X25519(c_u, c_v)) -- routed through the server.
2. mask: ``y_u = x_u + PRG(b_u) + sum_{v != u} +-PRG(s_uv) (mod 2^32)`` with
   ``s_uv = HKDF(X25519(s_u, s_v))`` and ``+`` if u < v else ``-``; PRG is the ChaCha20 keystream.
   Clients that drop out *after* step 1 (before their ``y_u`` arrives) are the dropped set.
3. unmask: every survivor reveals, for each other client, the share of ``b_u`` if u survived or the
   share of u's ``s`` secret key if u dropped (never both). With >= t survivors the server
   reconstructs them, removes the survivors' self masks and the dropped clients' pairwise masks, and
   obtains exactly the sum of the survivors' quantised inputs.

Inputs are quantised to the ring Z_{2^32}: values are clipped to ``[-clip, clip]``, multiplied by
``scale`` and rounded; the sum of ``max_clients`` inputs must fit in a signed 32-bit integer
(``max_clients * clip * scale < 2^31``), which :class:`Quantizer` checks.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

RING_BITS = 32
RING = np.uint32
#: the Mersenne prime 2^521 - 1: a field large enough for 32-byte secrets
PRIME = 2**521 - 1


# --- quantisation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quantizer:
    """Fixed-point encoding into Z_{2^32}: clip to [-clip, clip], scale, round; sums decode exactly."""

    clip: float = 1.0
    scale: float = 2.0**16
    max_clients: int = 1000

    def __post_init__(self) -> None:
        if not self.clip > 0:
            raise ValueError(f"quantizer clip must be > 0, got {self.clip}")
        if not self.scale > 0:
            raise ValueError(f"quantizer scale must be > 0, got {self.scale}")
        if self.max_clients * (round(self.clip * self.scale) + 1) >= 2 ** (RING_BITS - 1):
            raise ValueError(
                f"quantizer: max_clients * clip * scale = {self.max_clients * self.clip * self.scale:.3g} "
                f"would overflow the signed {RING_BITS}-bit ring; lower scale, clip or max_clients"
            )

    def encode(self, x: np.ndarray) -> np.ndarray:
        q = np.rint(np.clip(np.asarray(x, dtype=np.float64), -self.clip, self.clip) * self.scale).astype(np.int64)
        return q.astype(RING)  # two's complement wrap into the ring

    def decode_sum(self, ring_sum: np.ndarray) -> np.ndarray:
        return ring_sum.astype(RING).view(np.int32).astype(np.float64) / self.scale


# --- primitives (all from `cryptography`; Shamir is plain field arithmetic) --------------------------


def _hkdf(secret: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def prg(seed: bytes, length: int) -> np.ndarray:
    """``length`` ring elements from the ChaCha20 keystream keyed by HKDF(seed)."""
    key = _hkdf(seed, b"fedlight/secagg/prg")
    stream = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor().update(b"\x00" * (4 * length))
    return np.frombuffer(stream, dtype="<u4").astype(RING)


def _pub_bytes(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _priv_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def pairwise_seed(private: X25519PrivateKey, peer_public: bytes, session: bytes, u: int, v: int) -> bytes:
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    lo, hi = sorted((u, v))
    return _hkdf(shared, b"fedlight/secagg/pair/" + session + f"/{lo}/{hi}".encode())


def shamir_split(secret: bytes, n: int, t: int, xs: list[int]) -> dict[int, int]:
    """Shares ``{x: f(x)}`` of ``secret`` (a polynomial of degree t-1 over GF(PRIME), f(0) = secret)."""
    value = int.from_bytes(secret, "big")
    if value >= PRIME:
        raise ValueError("secret too large for the field")
    coeffs = [value] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    return {x: sum(c * pow(x, i, PRIME) for i, c in enumerate(coeffs)) % PRIME for x in xs}


def shamir_combine(shares: dict[int, int], t: int, length: int = 32) -> bytes:
    """Lagrange interpolation at 0 from any ``t`` shares."""
    if len(shares) < t:
        raise ValueError(f"need {t} shares to reconstruct, got {len(shares)}")
    points = list(shares.items())[:t]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    return secret.to_bytes(length, "big")


def _x(client_id: int) -> int:
    return client_id + 1  # Shamir evaluation point; never 0


# --- protocol parties ----------------------------------------------------------------------------------


class SecAggClient:
    """One client's side of the protocol; holds its input and secrets, sends only masked values."""

    def __init__(self, client_id: int, threshold: int, session: bytes = b"") -> None:
        self.id = client_id
        self.threshold = threshold
        self.session = session
        self._c = X25519PrivateKey.generate()
        self._s = X25519PrivateKey.generate()
        self._b = os.urandom(32)
        self._roster: dict[int, tuple[bytes, bytes]] = {}
        self._received: dict[int, bytes] = {}  # sender -> encrypted share bundle
        self._masked_set: list[int] = []

    def advertise(self) -> tuple[bytes, bytes]:
        return _pub_bytes(self._c.public_key()), _pub_bytes(self._s.public_key())

    def to_state(self) -> dict[str, bytes | int | list[int] | list[bytes]]:
        """This party's secrets and protocol state as flat bytes/ints/lists, for a client that runs each step
        in a fresh process (a Flower SuperNode keeps it in its node state between the messages of a round)."""
        state: dict[str, bytes | int | list[int] | list[bytes]] = {
            "id": self.id, "threshold": self.threshold, "session": self.session,
            "c": _priv_bytes(self._c), "s": _priv_bytes(self._s), "b": self._b,
        }  # fmt: skip
        if self._roster:
            state["roster"] = sorted(self._roster)
            state["roster-c"] = [self._roster[v][0] for v in sorted(self._roster)]
            state["roster-s"] = [self._roster[v][1] for v in sorted(self._roster)]
        if self._received:
            state["received"] = sorted(self._received)
            state["bundles"] = [self._received[v] for v in sorted(self._received)]
        if self._masked_set:
            state["masked-set"] = list(self._masked_set)
        if hasattr(self, "_own_shares"):
            state["own-shares"] = [share.to_bytes(66, "big") for share in self._own_shares]
        return state

    @classmethod
    def from_state(cls, state: dict) -> SecAggClient:
        """The party :meth:`to_state` saved."""
        client = cls(int(state["id"]), int(state["threshold"]), bytes(state["session"]))
        client._c = X25519PrivateKey.from_private_bytes(bytes(state["c"]))
        client._s = X25519PrivateKey.from_private_bytes(bytes(state["s"]))
        client._b = bytes(state["b"])
        ids = [int(v) for v in state.get("roster", [])]
        keys = zip(ids, state.get("roster-c", []), state.get("roster-s", []), strict=True)
        client._roster = {v: (bytes(c), bytes(s)) for v, c, s in keys}
        got = [int(v) for v in state.get("received", [])]
        client._received = dict(zip(got, (bytes(b) for b in state.get("bundles", [])), strict=True))
        client._masked_set = [int(v) for v in state.get("masked-set", [])]
        if "own-shares" in state:
            b_share, s_share = (int.from_bytes(bytes(x), "big") for x in state["own-shares"])
            client._own_shares = (b_share, s_share)
        return client

    def _channel(self, peer: int) -> AESGCM:
        shared = self._c.exchange(X25519PublicKey.from_public_bytes(self._roster[peer][0]))
        lo, hi = sorted((self.id, peer))
        return AESGCM(_hkdf(shared, b"fedlight/secagg/channel/" + self.session + f"/{lo}/{hi}".encode()))

    def share_keys(self, roster: dict[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Encrypted bundles ``{recipient: ciphertext}`` holding Shamir shares of b_u and s_u's secret key."""
        if len(roster) < self.threshold:
            raise ValueError(f"only {len(roster)} clients advertised keys; threshold is {self.threshold}")
        self._roster = dict(roster)
        peers = sorted(roster)
        xs = [_x(v) for v in peers]
        b_shares = shamir_split(self._b, len(peers), self.threshold, xs)
        s_shares = shamir_split(_priv_bytes(self._s), len(peers), self.threshold, xs)
        out = {}
        for v in peers:
            if v == self.id:
                continue
            plain = b_shares[_x(v)].to_bytes(66, "big") + s_shares[_x(v)].to_bytes(66, "big")
            nonce = os.urandom(12)
            out[v] = nonce + self._channel(v).encrypt(nonce, plain, f"{self.id}->{v}".encode())
        self._own_shares = (b_shares[_x(self.id)], s_shares[_x(self.id)])
        return out

    def receive_shares(self, bundles: dict[int, bytes]) -> None:
        self._received = dict(bundles)

    def masked_input(self, x_ring: np.ndarray, u1: list[int]) -> np.ndarray:
        """``y_u``: the quantised input plus the self mask and the pairwise masks with every v in U1."""
        if self.id not in u1:
            raise ValueError("client is not in the share-holding set U1")
        self._masked_set = sorted(u1)
        y = np.asarray(x_ring, dtype=RING) + prg(self._b, x_ring.size)
        for v in self._masked_set:
            if v == self.id:
                continue
            mask = prg(pairwise_seed(self._s, self._roster[v][1], self.session, self.id, v), x_ring.size)
            y = y + mask if self.id < v else y - mask
        return y

    def unmask(self, survivors: list[int]) -> dict[str, dict[int, int]]:
        """Shares to reveal: of b_u for surviving u, of s_u's key for dropped u (never both for one u)."""
        survivors = sorted(survivors)
        if self.id not in survivors:
            raise ValueError("a dropped client does not take part in unmasking")
        if len(survivors) < self.threshold:
            raise ValueError(f"only {len(survivors)} survivors; threshold is {self.threshold}: refusing to unmask")
        if not set(survivors) <= set(self._masked_set):
            raise ValueError("survivor list contains clients that were not in U1")
        b_out, s_out = {}, {}
        for u in self._masked_set:
            if u == self.id:
                b_share, s_share = self._own_shares
            else:
                bundle = self._received[u]
                plain = self._channel(u).decrypt(bundle[:12], bundle[12:], f"{u}->{self.id}".encode())
                b_share, s_share = int.from_bytes(plain[:66], "big"), int.from_bytes(plain[66:], "big")
            if u in survivors:
                b_out[u] = b_share
            else:
                s_out[u] = s_share
        return {"b": b_out, "s": s_out}


class SecAggServer:
    """The server's side: routes opaque bundles, sums masked vectors, reconstructs only what it must.

    It never receives a client's unmasked vector; after :meth:`finish` it holds the ring sum of the
    surviving clients' inputs, and nothing else derived from their inputs.
    """

    def __init__(self, threshold: int, dim: int, session: bytes = b"") -> None:
        if threshold < 1:
            raise ValueError(f"secure aggregation threshold must be >= 1, got {threshold}")
        self.threshold = threshold
        self.dim = dim
        self.session = session
        self.roster: dict[int, tuple[bytes, bytes]] = {}
        self.outbox: dict[int, dict[int, bytes]] = {}
        self.u1: list[int] = []
        self.masked: dict[int, np.ndarray] = {}
        self.received_log: list[tuple[str, int, object]] = []  # everything the server was sent

    def receive_keys(self, client_id: int, keys: tuple[bytes, bytes]) -> None:
        self.received_log.append(("keys", client_id, keys))
        self.roster[client_id] = keys

    def receive_bundles(self, sender: int, bundles: dict[int, bytes]) -> None:
        self.received_log.append(("bundles", sender, bundles))
        for recipient, ct in bundles.items():
            self.outbox.setdefault(recipient, {})[sender] = ct
        self.u1 = sorted(set(self.u1) | {sender})

    def bundles_for(self, client_id: int) -> dict[int, bytes]:
        return dict(self.outbox.get(client_id, {}))

    def receive_masked(self, client_id: int, y: np.ndarray) -> None:
        if client_id not in self.u1:
            raise ValueError(f"client {client_id} did not share keys; its masked input cannot be unmasked")
        y = np.asarray(y, dtype=RING)
        if y.shape != (self.dim,):
            raise ValueError(f"masked input of client {client_id} has shape {y.shape}, expected ({self.dim},)")
        self.received_log.append(("masked", client_id, y))
        self.masked[client_id] = y

    @property
    def survivors(self) -> list[int]:
        return sorted(self.masked)

    def finish(self, reveals: dict[int, dict[str, dict[int, int]]]) -> np.ndarray:
        """The ring sum of the survivors' inputs from their masked vectors and revealed shares."""
        survivors = self.survivors
        if len(survivors) < self.threshold:
            raise ValueError(f"only {len(survivors)} survivors, fewer than the threshold {self.threshold}")
        for v, r in reveals.items():
            self.received_log.append(("reveal", v, r))
        dropped = [u for u in self.u1 if u not in self.masked]
        total = np.zeros(self.dim, dtype=RING)
        for y in self.masked.values():
            total = total + y
        for u in survivors:
            shares = {_x(v): r["b"][u] for v, r in reveals.items() if u in r["b"]}
            total = total - prg(shamir_combine(shares, self.threshold), self.dim)
        for u in dropped:
            shares = {_x(v): r["s"][u] for v, r in reveals.items() if u in r["s"]}
            s_u = X25519PrivateKey.from_private_bytes(shamir_combine(shares, self.threshold))
            for v in survivors:  # v's y_v holds +PRG(s_vu) if v < u else -PRG(s_vu): remove it
                mask = prg(pairwise_seed(s_u, self.roster[v][1], self.session, u, v), self.dim)
                total = total - mask if v < u else total + mask
        self.result = total
        return total


def secure_sum(
    inputs: dict[int, np.ndarray],
    quantizer: Quantizer,
    threshold: int,
    drop_after_masking: AbstractSet[int] = frozenset(),
    session: bytes = b"",
) -> tuple[np.ndarray, SecAggServer]:
    """Run the whole protocol in-process; returns (decoded sum of the survivors, the server object).

    ``drop_after_masking``: clients that complete key sharing and masking but whose masked vector
    never reaches the server.
    """
    ids = sorted(inputs)
    dim = int(next(iter(inputs.values())).size)
    server = SecAggServer(threshold, dim, session)
    clients = {i: SecAggClient(i, threshold, session) for i in ids}
    for i, c in clients.items():
        server.receive_keys(i, c.advertise())
    for i, c in clients.items():
        server.receive_bundles(i, c.share_keys(server.roster))
    for i, c in clients.items():
        c.receive_shares(server.bundles_for(i))
    for i, c in clients.items():
        y = c.masked_input(quantizer.encode(inputs[i]), server.u1)
        if i not in drop_after_masking:
            server.receive_masked(i, y)
    reveals = {v: clients[v].unmask(server.survivors) for v in server.survivors}
    ring_sum = server.finish(reveals)
    return quantizer.decode_sum(ring_sum), server
