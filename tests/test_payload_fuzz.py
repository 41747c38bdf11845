"""Seeded fuzzing of the server's update path: every registered codec, >= 10,000 hostile payloads.

Each payload goes through ``ServerPipeline.aggregate`` exactly as a client's update would, so the
assertions are about the server, not one decoder: no exception escapes, no rejection is an internal
error (a bug), no hostile payload is accepted, an accepted one is a well-formed update of the global
state's names, shapes and dtype, each call is well under a second, and memory stays bounded by the
payload (tracemalloc here; a fresh process's peak RSS for a 1 MB decompression bomb below).
"""

from __future__ import annotations

import json
import lzma
import random
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import torch

from fedlight.aggregators.fedavg import FedAvg
from fedlight.codecs import wire
from fedlight.codecs.base import Codec
from fedlight.codecs.compress import CompressCodec
from fedlight.codecs.identity import IdentityCodec as IdentityForGuard
from fedlight.codecs.quantize import Int4Codec
from fedlight.codecs.sparsify import TopKCodec
from fedlight.core.server import INTERNAL_ERROR, ServerPipeline
from fedlight.core.update import ClientUpdate
from fedlight.plugins import build_registry
from fedlight.privacy.none import NoPrivacy

REGISTRY = build_registry(autoload=False)
CODECS: list[Codec] = [
    REGISTRY.entries["codecs"][n].cls(**REGISTRY.entries["codecs"][n].cls.example_args) for n in REGISTRY.names("codecs")
]
# compress around the codecs whose inner payloads carry shapes in their data, and lzma
CODECS += [CompressCodec(inner=Int4Codec()), CompressCodec(inner=TopKCodec(density=0.1)), CompressCodec(algorithm="lzma", level=1)]
PER_CODEC = 1000  # x 10 codec configurations + the codec-independent cases: > 10,000 payloads
MAX_SECONDS = 1.0


def _global() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"layer.lora_A": torch.randn(8, 24, generator=g), "layer.lora_B": torch.zeros(6, 8), "bias": torch.randn(5, generator=g)}


def _delta(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in _global().items()}


def _reseal(body: bytes) -> bytes:
    """A payload with a valid CRC32 over ``body`` (what a hostile or buggy encoder can always do)."""
    return body + struct.pack("<I", zlib.crc32(body))


def _frame(header: bytes, data: bytes) -> bytes:
    return _reseal(wire.MAGIC + struct.pack("<I", len(header)) + header + data)


def _split(payload: bytes) -> tuple[dict, bytes]:
    (hlen,) = struct.unpack_from("<I", payload, 4)
    return json.loads(payload[8 : 8 + hlen]), payload[8 + hlen : -4]


# ---------------------------------------------------------------------------------------------
# Hostile header values: each entry replaces one field of a legitimate header
# ---------------------------------------------------------------------------------------------

HOSTILE = [None, True, 0, -1, 1.5, 2**62, -(2**62), "", "x" * 5000, [], {}, [[[]]], "float32", {"a": 1}, [0, 2**40]]
SHAPES = [
    [-1], [2**62], [0, 2**40], [2**40, 0], [1] * 40, [2.0], [True], ["8"], [[8]], "8", None, {}, [0], [],
    [2**31, 2**31], [24, 8], [8, 24, 1], [1, 8, 24], [0, 0, 0, 0],
]  # fmt: skip


def _header_mutations(header: dict, rng: random.Random) -> Iterator[tuple[str, Callable[[dict], object]]]:
    """(label, mutate) pairs; ``mutate`` edits a deep copy of the header (or returns raw header bytes)."""
    entries = header["buffers"]
    i = rng.randrange(len(entries)) if entries else 0

    def at(key: str, value: object) -> Callable[[dict], object]:
        def f(h: dict) -> None:  # a "hostile" value that happens to be the legitimate one is no mutation
            h["buffers"][i][key] = None if h["buffers"][i][key] == value else value

        return f

    yield "top-level list", lambda h: [h["meta"], h["buffers"]]
    yield "top-level string", lambda h: "buffers"
    yield "missing buffers", lambda h: h.pop("buffers")
    yield "missing meta", lambda h: h.pop("meta")
    yield "extra key", lambda h: h.update(extra=1)
    yield "meta list", lambda h: h.update(meta=[h["meta"]])
    yield "meta null", lambda h: h.update(meta=None)
    yield "meta wrong codec", lambda h: h["meta"].update(codec="int8" if h["meta"]["codec"] != "int8" else "bf16")
    yield "meta extra key", lambda h: h["meta"].update(surprise=[1, 2])
    yield "meta missing key", lambda h: h["meta"].pop(rng.choice(sorted(h["meta"])))
    yield "meta param type", lambda h: h["meta"].update({rng.choice(sorted(h["meta"])): rng.choice(HOSTILE)})
    yield "buffers dict", lambda h: h.update(buffers={"0": h["buffers"]})
    yield "buffers string", lambda h: h.update(buffers="[]")
    yield "buffers empty", lambda h: h.update(buffers=[])
    if not entries:
        return
    yield "entry not a dict", lambda h: h["buffers"].__setitem__(i, rng.choice(HOSTILE[:9]))
    yield "entry missing key", lambda h: h["buffers"][i].pop(rng.choice(["name", "dtype", "shape", "nbytes"]))
    yield "entry extra key", lambda h: h["buffers"][i].update(offset=0)
    yield "name hostile", at("name", rng.choice(HOSTILE))
    yield "name unknown", at("name", "evil.weight")
    yield "name duplicate", at("name", entries[(i + 1) % len(entries)]["name"])
    yield "buffers reordered", lambda h: h["buffers"].reverse() if len(h["buffers"]) > 1 else h["buffers"].append(h["buffers"][0])
    yield "buffer dropped", lambda h: h["buffers"].pop(i)
    yield "buffer repeated", lambda h: h["buffers"].append(dict(h["buffers"][i]))
    yield "dtype hostile", at("dtype", rng.choice([*HOSTILE, "float8", "complex64", "object"]))
    others = sorted(set(wire._DTYPES) - {entries[i]["dtype"]})
    yield "dtype other valid", at("dtype", rng.choice(others))
    yield "shape hostile", at("shape", rng.choice(SHAPES))
    yield "nbytes hostile", at("nbytes", rng.choice(HOSTILE))
    yield "nbytes off by one", at("nbytes", entries[i]["nbytes"] + rng.choice([-1, 1]))
    depth = rng.choice([17, 100, 10_000, 200_000])
    yield f"nested {depth} deep", lambda h: b'{"meta":' + b"[" * depth + b"]" * depth + b',"buffers":[]}'
    yield "not utf-8", lambda h: b'{"meta":{"codec":"\xff\xfe"},"buffers":[]}'
    yield "NaN literal", lambda h: json.dumps(h).replace(str(entries[i]["nbytes"]), "NaN", 1).encode()
    yield "huge int literal", lambda h: json.dumps(h).replace(str(entries[i]["nbytes"]), "9" * 5000, 1).encode()


def _crafted(payload: bytes, rng: random.Random) -> Iterator[tuple[str, bytes]]:
    """Legitimate payload, one header field made hostile, data re-fitted to the claimed sizes, CRC recomputed."""
    header, data = _split(payload)
    for label, mutate in _header_mutations(header, rng):
        h = json.loads(json.dumps(header))
        out = mutate(h)
        if isinstance(out, bytes):
            raw = out
        else:
            h = h if out is None else out
            raw = json.dumps(h, separators=(",", ":")).encode()
        # data: as it was, or grown/shrunk to what the mutated header claims (so deeper checks run)
        claimed = _claimed_bytes(h if not isinstance(out, bytes) else None)
        fitted = data if claimed is None or rng.random() < 0.3 else (data + bytes(max(0, claimed - len(data))))[:claimed]
        yield label, _frame(raw, fitted)


def _claimed_bytes(header: object) -> int | None:
    try:
        n = sum(e["nbytes"] for e in header["buffers"])  # type: ignore[index]
    except Exception:  # noqa: BLE001 - a mangled header claims nothing usable
        return None
    return n if isinstance(n, int) and 0 <= n <= 1 << 16 else None


def _compress_streams(codec: CompressCodec, rng: random.Random) -> Iterator[tuple[str, bytes]]:
    """Crafted compress payloads: bombs, lies about the size, corrupt/truncated/trailing streams, and
    inner payloads that are themselves hostile (so the inner decode against the reference is fuzzed)."""
    meta = codec.meta()
    inner_ok = codec.inner.encode(_delta(rng.randrange(1000)))

    def pack(stream: bytes, size: int) -> bytes:
        buffers = [
            wire.Buffer("compressed", torch.frombuffer(bytearray(stream), dtype=torch.uint8) if stream else torch.zeros(0, dtype=torch.uint8)),
            wire.Buffer("size", torch.tensor(size, dtype=torch.int64)),
        ]
        return wire.pack(buffers, meta)

    def deflate(raw: bytes) -> bytes:
        if codec.algorithm == "zlib":
            return zlib.compress(raw, 1)
        return lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=1)

    bomb = _BOMBS[codec.algorithm]
    yield "bomb, true size", pack(bomb, _BOMB_INFLATED)
    yield "bomb, legit size", pack(bomb, len(inner_ok))
    yield "bomb, size 2**40", pack(bomb, 2**40)
    ok = deflate(inner_ok)
    yield "size -1", pack(ok, -1)
    yield "size 0", pack(ok, 0)
    yield "size too small", pack(ok, len(inner_ok) - rng.randrange(1, 50))
    yield "size too large", pack(ok, len(inner_ok) + rng.randrange(1, 50))
    yield "truncated stream", pack(ok[: rng.randrange(len(ok))], len(inner_ok))
    yield "trailing data", pack(ok + deflate(b"more"), len(inner_ok))
    flipped = bytearray(ok)
    flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
    yield "flipped stream", pack(bytes(flipped), len(inner_ok))
    yield "random stream", pack(rng.randbytes(rng.randrange(1, 400)), len(inner_ok))
    yield "other algorithm", pack(zlib.compress(inner_ok) if codec.algorithm == "lzma" else lzma.compress(inner_ok), len(inner_ok))
    yield "inner of another shape", pack(deflate(raw := codec.inner.encode({"w": torch.ones(3, 3)})), len(raw))
    for label, inner_bad in _crafted(inner_ok, rng):
        yield f"inner {label}", pack(deflate(inner_bad), len(inner_bad))


_BOMB_INFLATED = 16 << 20  # 16 MiB of zeros: a 16 kB zlib stream, a 3 kB xz stream
_BOMBS = {
    "zlib": zlib.compress(bytes(_BOMB_INFLATED), 9),
    "lzma": lzma.compress(bytes(_BOMB_INFLATED), format=lzma.FORMAT_XZ, preset=1),
}


# ---------------------------------------------------------------------------------------------
# The campaign
# ---------------------------------------------------------------------------------------------


@dataclass
class Tally:
    tried: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    accepted: Counter = field(default_factory=Counter)
    crashed: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    max_seconds: float = 0.0
    max_traced_peak: int = 0


def _cases(codec: Codec, rng: random.Random) -> Iterator[tuple[str, bytes, bool]]:
    """(kind, payload, may_be_accepted) for one codec; ``may_be_accepted`` only for corrupt data behind a
    recomputed CRC, which can be a legitimate encoding of other numbers."""
    legit = [codec.encode(_delta(s)) for s in range(8)]
    yield "legit", legit[0], True
    while True:
        payload = rng.choice(legit)
        kind = rng.choices(["random", "truncated", "flip", "flip+crc", "header flip+crc", "crafted", "compress"], [1, 1, 2, 3, 2, 4, 3])[0]
        if kind == "random":
            body = rng.randbytes(rng.randrange(0, 600))
            yield kind, _reseal(wire.MAGIC + body) if rng.random() < 0.7 else body, False
        elif kind == "truncated":
            cut = payload[: rng.randrange(len(payload))]
            yield kind, _reseal(cut[:-4]) if rng.random() < 0.5 and len(cut) > 4 else cut, False
        elif kind in ("flip", "flip+crc"):
            bad = bytearray(payload)
            for _ in range(rng.randrange(1, 4)):
                bad[rng.randrange(len(bad) - 4)] ^= 1 << rng.randrange(8)
            yield kind, bytes(bad) if kind == "flip" else _reseal(bytes(bad[:-4])), kind == "flip+crc" and _in_data(bytes(bad))
        elif kind == "header flip+crc":
            (hlen,) = struct.unpack_from("<I", payload, 4)
            bad = bytearray(payload)
            bad[rng.randrange(8 + hlen)] ^= 1 << rng.randrange(8)
            yield kind, _reseal(bytes(bad[:-4])), False
        elif kind == "crafted":
            yield from ((f"crafted: {label}", p, False) for label, p in rng.sample(list(_crafted(payload, rng)), 4))
        elif isinstance(codec, CompressCodec):
            streams = list(_compress_streams(codec, rng))
            yield from ((f"compress: {label}", p, False) for label, p in streams[:3] + rng.sample(streams[3:], 4))


def _in_data(payload: bytes) -> bool:
    """Whether a resealed bit-flipped payload kept its header intact (only the data changed)."""
    try:
        (hlen,) = struct.unpack_from("<I", payload, 4)
        json.loads(payload[8 : 8 + hlen])
    except Exception:  # noqa: BLE001
        return False
    return True


def _well_formed(delta: dict[str, torch.Tensor], glob: dict[str, torch.Tensor]) -> bool:
    return list(delta) == list(glob) and all(
        delta[k].shape == glob[k].shape and delta[k].dtype == torch.float32 and bool(torch.isfinite(delta[k]).all()) for k in glob
    )


def _check(server: ServerPipeline, glob, kind: str, payload: object, may_accept: bool, tally: Tally, trace: bool) -> None:
    tally.tried[kind.split(":")[0]] += 1
    update = ClientUpdate(0, 3, payload)  # type: ignore[arg-type]
    if trace:
        tracemalloc.start()
    t0 = time.perf_counter()
    try:
        new, report = server.aggregate(glob, [update], torch.Generator().manual_seed(0))
    except Exception as err:  # noqa: BLE001 - the assertion is that this never happens
        tally.crashed.append(f"{kind}: {type(err).__name__}: {err}")
        return
    finally:
        tally.max_seconds = max(tally.max_seconds, time.perf_counter() - t0)
        if trace:
            tally.max_traced_peak = max(tally.max_traced_peak, tracemalloc.get_traced_memory()[1] - len(payload))
            tracemalloc.stop()
    if report.rejected:
        tally.rejected[kind.split(":")[0]] += 1
        if report.rejected[0].startswith(INTERNAL_ERROR):
            tally.crashed.append(f"{kind}: {report.rejected[0]}")
        return
    tally.accepted[kind.split(":")[0]] += 1
    delta = server.decode_update(update, glob)
    if not may_accept or not _well_formed(delta, glob) or not all(torch.isfinite(v).all() for v in new.values()):
        tally.wrong.append(f"{kind}: accepted {[(k, tuple(v.shape)) for k, v in delta.items()]}")


def test_fuzz_the_server_update_path_with_every_codec() -> None:
    glob = _global()
    tally = Tally()
    started = time.perf_counter()
    for c, codec in enumerate(CODECS):
        rng = random.Random(1000 + c)
        server = ServerPipeline(codec, codec, FedAvg(), NoPrivacy())
        cases = _cases(codec, rng)
        for n in range(PER_CODEC):
            kind, payload, may_accept = next(cases)
            _check(server, glob, kind, payload, may_accept, tally, trace=n % 50 == 0 or "bomb" in kind)
        # codec-independent: not bytes at all
        for payload in (None, "FLW2", 42, [1, 2], {"a": 1}, memoryview(b"FLW2")):
            _check(server, glob, "not bytes", payload, False, tally, trace=False)
    elapsed = time.perf_counter() - started
    tried = sum(tally.tried.values())
    print(
        f"\n[fuzz] {tried} payloads over {len(CODECS)} codec configurations in {elapsed:.1f} s: "
        f"rejected {sum(tally.rejected.values())}, accepted {sum(tally.accepted.values())} "
        f"({dict(tally.accepted)}), crashed {len(tally.crashed)}, wrong accepts {len(tally.wrong)}; "
        f"max time per aggregate {tally.max_seconds * 1e3:.1f} ms; max traced Python memory beyond the payload "
        f"{tally.max_traced_peak / 1e6:.2f} MB"
    )
    assert tried >= 10_000
    assert not tally.crashed, tally.crashed[:5]
    assert not tally.wrong, tally.wrong[:5]
    assert tally.accepted["legit"] == len(CODECS)
    assert sum(tally.rejected.values()) > 0.9 * tried  # the campaign really is hostile
    assert tally.max_seconds < MAX_SECONDS
    assert tally.max_traced_peak < 4_000_000  # bombs of 16 MiB inflate to at most the inner bound


def test_codec_decode_without_a_reference_raises_only_payload_errors() -> None:
    """The client's decode of a broadcast has no reference: hostile payloads still fail as PayloadError.

    (Bombs are left out: without a reference nothing says 16 MiB of zeros is not a legitimate
    payload, so inflation is bounded only by ``compress.MAX_INFLATED_BYTES``; the server always has one.)
    """
    for c, codec in enumerate(CODECS):
        rng = random.Random(2000 + c)
        cases = _cases(codec, rng)
        for _ in range(100):
            kind, payload, _ = next(cases)
            if "bomb" in kind:
                continue
            try:
                codec.decode(payload)
            except wire.PayloadError:
                pass


# ---------------------------------------------------------------------------------------------
# Memory of a 1 MB decompression bomb, measured as a fresh process's peak RSS
# ---------------------------------------------------------------------------------------------

_RSS_SCRIPT = r"""
import resource, zlib, torch
from fedlight.aggregators.fedavg import FedAvg
from fedlight.codecs import wire
from fedlight.codecs.compress import CompressCodec
from fedlight.codecs.identity import IdentityCodec as IdentityForGuard
from fedlight.codecs.quantize import Int4Codec
from fedlight.core.server import ServerPipeline
from fedlight.core.update import ClientUpdate
from fedlight.privacy.none import NoPrivacy

glob = {"w": torch.zeros(256, 256)}
codec = CompressCodec()
server = ServerPipeline(codec, codec, FedAvg(), NoPrivacy())
# a zlib stream of ~1 MB that inflates to ~1 GB of zeros, built without holding 1 GB: after the first
# full flush every 1 MiB of zeros deflates to the same bytes
z = zlib.compressobj(9)
zeros = bytes(1 << 20)
first = z.compress(zeros) + z.flush(zlib.Z_FULL_FLUSH)
block = z.compress(zeros) + z.flush(zlib.Z_FULL_FLUSH)
stream = first + block * ((1 << 20) // len(block))
def bomb(size):
    bufs = [wire.Buffer("compressed", torch.frombuffer(bytearray(stream), dtype=torch.uint8)),
            wire.Buffer("size", torch.tensor(size, dtype=torch.int64))]
    return wire.pack(bufs, codec.meta())
payloads = [bomb(1 << 30), bomb(len(codec.inner.encode(glob)))]
int4 = Int4Codec()
bufs, meta = wire.unpack(int4.encode(glob))
bufs[2] = wire.Buffer("w#shape", torch.tensor([1 << 15, 1 << 15], dtype=torch.int64))  # claims 1 G values
payloads.append(wire.pack(bufs, meta))
legit = ClientUpdate(0, 1, codec.encode(glob))
server.aggregate(glob, [legit], torch.Generator())  # warm up allocator and caches
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
servers = [server, server, ServerPipeline(int4, int4, FedAvg(), NoPrivacy())]
for p, s in zip(payloads, servers):
    _, report = s.aggregate(glob, [ClientUpdate(0, 1, p)], torch.Generator())
    assert report.rejected, report
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(payloads[0]), (after - before) * 1024)
"""


def test_a_1mb_decompression_bomb_does_not_raise_server_memory() -> None:
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True, timeout=120, check=True)
    size, grown = map(int, out.stdout.split())
    print(f"\n[fuzz] {size / 1e6:.2f} MB bomb (inflates to 1 GiB): peak RSS grew by {grown / 1e6:.2f} MB")
    assert size > 1_000_000
    assert grown < 8_000_000


# ---------------------------------------------------------------------------------------------
# Finite but absurd updates: the default median guard and the non-finite-aggregate skip
# ---------------------------------------------------------------------------------------------


def _updates(deltas: list[dict[str, torch.Tensor]]) -> list[ClientUpdate]:
    codec = IdentityForGuard()
    return [ClientUpdate(i, 10 + i, codec.encode(d)) for i, d in enumerate(deltas)]


def test_median_guard_rejects_exactly_the_absurd_updates_of_a_seeded_table() -> None:
    """Random rounds: 1-8 honest updates with norms spread up to 20x, 0-2 absurd ones (norm 1e30 or
    values 3e38). An update is rejected iff there are >= 3 valid updates and its norm exceeds 100x
    their median; what is aggregated is then the mean of the rest, and the run's model stays finite."""
    glob = {k: torch.zeros_like(v) for k, v in _global().items()}
    server = ServerPipeline(IdentityForGuard(), IdentityForGuard(), FedAvg(weighting="uniform"), NoPrivacy())
    assert server.max_norm_over_median == 100.0 and server.median_guard_active
    rng = random.Random(7)
    seen = Counter()
    for trial in range(200):
        honest = [{k: v * rng.uniform(0.05, 1.0) for k, v in _delta(1000 * trial + j).items()} for j in range(rng.randint(1, 8))]
        absurd = []
        for _ in range(rng.choice([0, 1, 1, 2])):
            d = _delta(rng.randrange(10**6))
            absurd.append(
                {k: v * (1e30 / 0.1) for k, v in d.items()} if rng.random() < 0.5 else {k: torch.full_like(v, 3e38) for k, v in d.items()}
            )
        deltas = honest + absurd
        rng.shuffle(deltas)
        new, report = server.aggregate(glob, _updates(deltas), torch.Generator())
        norms = [float(torch.cat([v.double().reshape(-1) for v in d.values()]).norm()) for d in deltas]
        median = sorted(norms)[len(norms) // 2] if len(norms) % 2 else sum(sorted(norms)[len(norms) // 2 - 1 : len(norms) // 2 + 1]) / 2
        expect_rejected = {i for i, n in enumerate(norms) if len(norms) >= 3 and n > 100 * median}
        if report.skipped:  # what is left overflows fp32 (e.g. two updates of 3e38 values)
            seen["skipped"] += 1
            assert new is glob and report.accepted == [] and set(report.rejected) == set(range(len(deltas)))
            assert len(deltas) - len(expect_rejected) >= 2, report.skipped
            continue
        assert set(report.rejected) == expect_rejected, (trial, norms)
        kept = [d for i, d in enumerate(deltas) if i not in expect_rejected]
        for k in glob:
            mean = sum(d[k].double() for d in kept) / len(kept)
            torch.testing.assert_close(new[k], mean.float(), rtol=1e-6, atol=0)
        seen["absurd rejected" if expect_rejected else ("absurd kept (< 3 updates)" if absurd else "honest")] += 1
        if not absurd:
            assert not report.rejected  # honest rounds (norms within 20x) are untouched
    print(f"\n[guard] {dict(seen)}")
    assert seen["absurd rejected"] > 30 and seen["honest"] > 30


def test_a_round_whose_aggregate_is_not_finite_is_skipped() -> None:
    """Two clients (the median guard cannot judge), values near the fp32 maximum: the second round's
    aggregate overflows, so it is not applied and every accepted update is reported with the reason."""
    server = ServerPipeline(IdentityForGuard(), IdentityForGuard(), FedAvg(), NoPrivacy())
    glob = {"w": torch.zeros(4)}
    big = [{"w": torch.full((4,), 3e38)}, {"w": torch.full((4,), 3.2e38)}]
    once, report = server.aggregate(glob, _updates(big), torch.Generator())
    assert report.accepted == [0, 1] and not report.skipped and bool(torch.isfinite(once["w"]).all())
    twice, report = server.aggregate(once, _updates(big), torch.Generator())
    assert twice is once and report.accepted == [] and "not finite" not in report.skipped
    assert report.skipped.startswith("round skipped, global state unchanged") and "NaN/Inf" in report.skipped
    assert set(report.rejected) == {0, 1} and all(r == report.skipped for r in report.rejected.values())


def test_the_guard_is_configurable_and_off_where_it_cannot_be_sound() -> None:
    from fedlight.privacy.dp_fedavg import DPFedAvg

    codec = IdentityForGuard()
    off = ServerPipeline(codec, codec, FedAvg(), NoPrivacy(), max_norm_over_median=None)
    deltas = [_delta(1), _delta(2), {k: v * 1e30 for k, v in _delta(3).items()}]
    glob = {k: torch.zeros_like(v) for k, v in _global().items()}
    _, report = off.aggregate(glob, _updates(deltas), torch.Generator())
    assert report.accepted == [0, 1, 2]
    tight = ServerPipeline(codec, codec, FedAvg(), NoPrivacy(), max_norm_over_median=1.5)
    _, report = tight.aggregate(glob, _updates(deltas), torch.Generator())
    assert list(report.rejected) == [2] and "1.5x the round's median" in report.rejected[2]
    dp = DPFedAvg(noise_multiplier=1.0, clip_norm=1.0, population=10, clients_per_round=3)
    assert not ServerPipeline(codec, codec, FedAvg(weighting="uniform"), dp).median_guard_active
    for bad in (1.0, 0.5, -3.0):
        with pytest.raises(ValueError, match=r"federation\.max_norm_over_median must be > 1"):
            ServerPipeline(codec, codec, FedAvg(), NoPrivacy(), max_norm_over_median=bad)


def test_bad_counts_and_codec_bugs_are_rejections_that_name_the_error() -> None:
    """A count that is not a positive integer is a rejection; so is a codec bug (any exception), whose
    reason names the exception type and where it was raised, so tests and logs still show it."""

    class Buggy(IdentityForGuard):
        def from_buffers(self, buffers, meta, reference=None):
            raise KeyError("oops")

    glob = {"w": torch.zeros(3)}
    payload = IdentityForGuard().encode({"w": torch.ones(3)})
    server = ServerPipeline(IdentityForGuard(), IdentityForGuard(), FedAvg(), NoPrivacy())
    counts = [0, -5, 1.5, True, "3", None]
    _, report = server.aggregate(glob, [ClientUpdate(i, n, payload) for i, n in enumerate(counts)], torch.Generator())  # type: ignore[arg-type]
    assert set(report.rejected) == set(range(len(counts))) and all("num_examples" in r for r in report.rejected.values())
    buggy = ServerPipeline(Buggy(), Buggy(), FedAvg(), NoPrivacy())
    _, report = buggy.aggregate(glob, [ClientUpdate(0, 1, payload), ClientUpdate(1, 1, payload)], torch.Generator())
    assert report.accepted == [] and report.rejected[0].startswith(f"{INTERNAL_ERROR} while decoding the update: KeyError at ")
    assert "test_payload_fuzz.py" in report.rejected[0]
