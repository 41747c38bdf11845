"""A self-describing, pickle-free, checksummed wire format for named tensors.

Layout (version 2)::

    b"FLW" + version byte b"2" | header length (uint32 LE) | UTF-8 JSON header | raw buffers | CRC32 (uint32 LE)

The header names the codec and its parameters and lists, per buffer, the name, dtype, shape and byte
length, so any process with fedlight can decode a payload and check it before trusting it. The trailing
CRC32 (``zlib.crc32``) covers every byte before it (magic, length, header and data), so any single flipped
byte, and any burst of up to 32 flipped bits, is rejected instead of decoding to different numbers.
A payload of another wire-format version (version 1 had no checksum) is rejected naming both versions.
"""

from __future__ import annotations

import json
import math
import re
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

#: the format version this fedlight writes and the only one it reads
VERSION = 2
_MAGIC_PREFIX = b"FLW"
MAGIC = _MAGIC_PREFIX + str(VERSION).encode()
_HEADER_LEN = struct.Struct("<I")
_CRC = struct.Struct("<I")
MAX_HEADER_BYTES = 64 * 1024 * 1024

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class PayloadError(ValueError):
    """A payload is truncated, corrupted (checksum mismatch), of another format version, or inconsistent
    with its own header."""


def framed_size(header_bytes: int, data_bytes: int) -> int:
    """Length of a payload with a JSON header of ``header_bytes`` and ``data_bytes`` of buffers."""
    return len(MAGIC) + _HEADER_LEN.size + header_bytes + data_bytes + _CRC.size


@dataclass
class Buffer:
    name: str
    tensor: torch.Tensor


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise PayloadError(f"dtype {dtype} cannot travel; supported: {sorted(_DTYPES)}") from None


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    # view as bytes so bf16 (which numpy lacks) travels bit-exactly
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _header(entries: list[dict[str, Any]], meta: dict[str, Any]) -> bytes:
    return json.dumps({"meta": meta, "buffers": entries}, separators=(",", ":")).encode()


def pack(buffers: list[Buffer], meta: dict[str, Any]) -> bytes:
    """Serialise buffers plus codec metadata into one payload."""
    entries = []
    blobs = []
    for buf in buffers:
        blob = _tensor_bytes(buf.tensor)
        entries.append(
            {
                "name": buf.name,
                "dtype": dtype_name(buf.tensor.dtype),
                "shape": list(buf.tensor.shape),
                "nbytes": len(blob),
            }
        )
        blobs.append(blob)
    header = _header(entries, meta)
    body = b"".join([MAGIC, _HEADER_LEN.pack(len(header)), header, *blobs])
    return body + _CRC.pack(zlib.crc32(body))


def _check_frame(payload: bytes) -> None:
    """Magic, version and checksum, before anything in the payload is parsed."""
    if len(payload) < len(MAGIC) or payload[:3] != _MAGIC_PREFIX:
        raise PayloadError("not a fedlight payload (bad magic or truncated before the header)")
    if payload[3:4] != MAGIC[3:4]:
        version = payload[3:4].decode("ascii", "replace")
        raise PayloadError(
            f"payload is in fedlight wire format version {version!r}; this fedlight reads only version {VERSION} "
            "(checksummed): encode it with the same fedlight version on both sides"
        )
    if len(payload) < len(MAGIC) + _HEADER_LEN.size + _CRC.size:
        raise PayloadError(f"payload of {len(payload)} bytes is truncated before the end of its header")
    (stored,) = _CRC.unpack_from(payload, len(payload) - _CRC.size)
    actual = zlib.crc32(memoryview(payload)[: len(payload) - _CRC.size])
    if stored != actual:
        raise PayloadError(
            f"payload checksum mismatch (CRC32 stored {stored:#010x}, computed {actual:#010x}): "
            "the payload was corrupted or truncated in transit"
        )


# ---------------------------------------------------------------------------------------------
# Decoding: every field of the header is checked before it is used (it comes from a peer)
# ---------------------------------------------------------------------------------------------

#: a real header nests 4 deep ({"buffers": [{"shape": [...]}]}); codec metadata may add a little
MAX_JSON_DEPTH = 16
#: at most this many dimensions per buffer (torch's own limit is 64)
MAX_RANK = 32
#: no dimension, and no product of the non-zero dimensions, may exceed this: a zero dimension does
#: not make ``[0, 2**60]`` a small tensor for any check that follows
MAX_NUMEL = 2**40
MAX_BUFFERS = 2**20
MAX_NAME_CHARS = 4096
_ENTRY_KEYS = frozenset({"name", "dtype", "shape", "nbytes"})
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_DEPTH_STEP = np.zeros(256, dtype=np.int8)
_DEPTH_STEP[[ord("["), ord("{")]] = 1
_DEPTH_STEP[[ord("]"), ord("}")]] = -1


@dataclass(frozen=True)
class TensorSpec:
    """What a receiver knows about a tensor before decoding it: its shape and the dtype it decodes to."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


#: the reference a payload is decoded against: tensor name -> spec, in the order they must travel
Spec = Mapping[str, TensorSpec]


def spec_of(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, TensorSpec]:
    """The reference of ``state``: its names and shapes, with ``dtype`` (default: each tensor's own)."""
    return {k: TensorSpec(tuple(v.shape), v.dtype if dtype is None else dtype) for k, v in state.items()}


@dataclass(frozen=True)
class BufferSpec:
    """One buffer a legitimate payload carries, as its header lists it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def header_bytes(layout: list[BufferSpec], meta: dict[str, Any]) -> bytes:
    """The exact JSON header :func:`pack` writes for buffers of ``layout`` (no data needed)."""
    entries = [
        {"name": b.name, "dtype": dtype_name(b.dtype), "shape": list(b.shape), "nbytes": b.nbytes} for b in layout
    ]
    return _header(entries, meta)


def payload_size(layout: list[BufferSpec], meta: dict[str, Any]) -> int:
    """The exact length of a payload of buffers ``layout`` with codec metadata ``meta``."""
    return framed_size(len(header_bytes(layout, meta)), sum(b.nbytes for b in layout))


def _json_depth(raw: bytes) -> int:
    """Deepest bracket nesting of a JSON text, without parsing it (so without recursion)."""
    skeleton = _STRING.sub(b'""', raw).translate(None, delete=_NOT_BRACKETS)
    depth, deepest = 0, 0
    steps = _DEPTH_STEP[np.frombuffer(skeleton, dtype=np.uint8)]
    for chunk in range(0, len(steps), 1 << 20):  # chunked: a hostile header of brackets stays cheap
        levels = depth + np.cumsum(steps[chunk : chunk + (1 << 20)], dtype=np.int64)
        deepest = max(deepest, int(levels.max()))
        depth = int(levels[-1])
    return deepest


def _parse_header(raw: bytes) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    if (depth := _json_depth(raw)) > MAX_JSON_DEPTH:
        raise PayloadError(f"payload header nests {depth} levels deep (at most {MAX_JSON_DEPTH}): corrupt or hostile")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise PayloadError(f"payload header is not valid JSON: {err}") from None
    if not isinstance(header, dict) or set(header) != {"meta", "buffers"}:
        keys = sorted(header) if isinstance(header, dict) else type(header).__name__
        raise PayloadError(f"payload header must be an object with keys 'meta' and 'buffers', got {keys}")
    meta, entries = header["meta"], header["buffers"]
    if not isinstance(meta, dict):
        raise PayloadError(f"payload header 'meta' must be an object, got {type(meta).__name__}")
    if not isinstance(entries, list):
        raise PayloadError(f"payload header 'buffers' must be a list, got {type(entries).__name__}")
    if len(entries) > MAX_BUFFERS:
        raise PayloadError(f"payload lists {len(entries)} buffers (at most {MAX_BUFFERS})")
    return meta, entries


def _check_meta(meta: dict[str, Any], expected: dict[str, Any]) -> None:
    """The header's codec metadata must be the decoder's own (compared as JSON: a tuple travels as a list)."""
    if meta.get("codec") != expected.get("codec"):
        raise PayloadError(
            f"payload was encoded by codec {str(meta.get('codec'))[:80]!r}, not {expected.get('codec')!r}"
        )
    want = json.loads(json.dumps(expected))
    if meta != want:
        keys = [k for k in sorted(set(meta) | set(want)) if meta.get(k) != want.get(k)][:8]
        raise PayloadError(
            f"{want.get('codec')} payload has "
            + ", ".join(f"{k[:40]}={str(meta.get(k))[:80]}" for k in keys)
            + "; this codec is configured with "
            + ", ".join(f"{k[:40]}={want.get(k)!r}" for k in keys)
        )


def _check_layout(got: list[tuple[str, torch.dtype, tuple[int, ...]]], layout: list[BufferSpec]) -> None:
    """The header's buffers must be exactly those a legitimate encoding of the reference state has."""
    for (name, dtype, shape), want in zip(got, layout):
        if name != want.name:
            raise PayloadError(
                f"payload buffer {name[:80]!r} where {want.name!r} is expected (names differ from the global state)"
            )
        if dtype != want.dtype:
            raise PayloadError(f"buffer {name!r}: dtype {dtype} where {want.dtype} is expected")
        if shape != want.shape:
            raise PayloadError(f"buffer {name!r}: shape {list(shape)} where the global state gives {list(want.shape)}")
    if len(got) != len(layout):
        missing = [b.name for b in layout[len(got) :]][:5]
        raise PayloadError(
            f"payload has {len(got)} buffers where the global state needs {len(layout)} "
            f"(tensor names differ: missing {missing}, unexpected {[g[0][:80] for g in got[len(layout) :]][:5]})"
        )


def _check_entry(e: Any, seen: set[str]) -> tuple[str, torch.dtype, tuple[int, ...], int]:
    """One buffer entry, every field type- and range-checked; returns (name, dtype, shape, nbytes)."""
    if not isinstance(e, dict) or set(e) != _ENTRY_KEYS:
        got = sorted(e) if isinstance(e, dict) else type(e).__name__
        raise PayloadError(f"buffer entry must be an object with keys {sorted(_ENTRY_KEYS)}, got {str(got)[:200]}")
    name, dtype, shape, nbytes = e["name"], e["dtype"], e["shape"], e["nbytes"]
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
        raise PayloadError(
            f"buffer name must be a non-empty string of at most {MAX_NAME_CHARS} characters, got {str(name)[:80]!r}"
        )
    if name in seen:
        raise PayloadError(f"buffer {name!r} appears twice in the payload")
    seen.add(name)
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise PayloadError(f"buffer {name!r}: dtype {str(dtype)[:40]!r} is not one of {sorted(_DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(type(s) is int for s in shape):
        raise PayloadError(
            f"buffer {name!r}: shape must be a list of at most {MAX_RANK} integers, got {str(shape)[:80]}"
        )
    if any(not 0 <= s <= MAX_NUMEL for s in shape) or math.prod(max(s, 1) for s in shape) > MAX_NUMEL:
        raise PayloadError(
            f"buffer {name!r}: shape {shape} has a negative or absurd dimension (at most {MAX_NUMEL} values)"
        )
    if type(nbytes) is not int:
        raise PayloadError(f"buffer {name!r}: nbytes must be an integer, got {str(nbytes)[:40]!r}")
    expected = math.prod(shape) * _itemsize(_DTYPES[dtype])
    if nbytes != expected:
        raise PayloadError(f"buffer {name!r}: {nbytes} bytes but shape {shape} of {dtype} needs {expected}")
    return name, _DTYPES[dtype], tuple(shape), nbytes


def unpack(
    payload: bytes,
    layout: list[BufferSpec] | None = None,
    max_header_bytes: int = MAX_HEADER_BYTES,
    expected_meta: dict[str, Any] | None = None,
) -> tuple[list[Buffer], dict[str, Any]]:
    """Parse a payload, validating the whole header before any buffer is copied.

    ``expected_meta`` (the decoder's own codec name and parameters) must equal the header's ``meta``.

    ``layout``, when the receiver knows it (:meth:`Codec.layout` of the reference state), is the exact
    list of buffers a legitimate payload carries: any other name, order, dtype or shape is rejected
    here, before the data is touched. Memory used is at most about twice the payload's length.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise PayloadError(f"payload must be bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    _check_frame(payload)
    end = len(payload) - _CRC.size  # the buffers end where the checksum starts
    (hlen,) = _HEADER_LEN.unpack_from(payload, len(MAGIC))
    start = len(MAGIC) + _HEADER_LEN.size
    if start + hlen > end:
        raise PayloadError(f"header length {hlen} exceeds the payload ({len(payload)} bytes): truncated or corrupt")
    if hlen > max_header_bytes:
        raise PayloadError(f"header of {hlen} bytes is larger than any legitimate one here ({max_header_bytes} bytes)")
    meta, raw_entries = _parse_header(payload[start : start + hlen])
    if expected_meta is not None:
        _check_meta(meta, expected_meta)
    seen: set[str] = set()
    entries = [_check_entry(e, seen) for e in raw_entries]
    if layout is not None:
        _check_layout([(n, d, s) for n, d, s, _ in entries], layout)
    offset = start + hlen
    if offset + sum(nbytes for *_, nbytes in entries) != end:
        total = sum(nbytes for *_, nbytes in entries)
        raise PayloadError(
            f"header lists {total} bytes of buffers, the payload holds {end - offset}: truncated or corrupt"
        )
    buffers: list[Buffer] = []
    for name, dtype, shape, nbytes in entries:
        raw = bytearray(payload[offset : offset + nbytes])
        offset += nbytes
        flat = torch.frombuffer(raw, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        buffers.append(Buffer(name, flat.view(dtype).reshape(shape)))
    return buffers, meta
