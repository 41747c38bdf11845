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
import struct
import zlib
from dataclasses import dataclass
from typing import Any

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


def pack(buffers: list[Buffer], meta: dict[str, Any]) -> bytes:
    """Serialise buffers plus codec metadata into one payload."""
    entries = []
    blobs = []
    for buf in buffers:
        blob = _tensor_bytes(buf.tensor)
        entries.append(
            {"name": buf.name, "dtype": dtype_name(buf.tensor.dtype), "shape": list(buf.tensor.shape), "nbytes": len(blob)}
        )
        blobs.append(blob)
    header = json.dumps({"meta": meta, "buffers": entries}, separators=(",", ":")).encode()
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


def unpack(payload: bytes) -> tuple[list[Buffer], dict[str, Any]]:
    """Parse a payload, validating every length against the header before touching the data."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise PayloadError(f"payload must be bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    _check_frame(payload)
    end = len(payload) - _CRC.size  # the buffers end where the checksum starts
    (hlen,) = _HEADER_LEN.unpack_from(payload, len(MAGIC))
    start = len(MAGIC) + _HEADER_LEN.size
    if hlen > MAX_HEADER_BYTES or start + hlen > end:
        raise PayloadError(f"header length {hlen} exceeds the payload ({len(payload)} bytes): truncated or corrupt")
    try:
        header = json.loads(payload[start : start + hlen].decode())
        meta, entries = header["meta"], header["buffers"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise PayloadError(f"payload header is not valid: {err}") from None
    offset = start + hlen
    buffers: list[Buffer] = []
    for e in entries:
        try:
            name, dtype, shape, nbytes = e["name"], _DTYPES[e["dtype"]], [int(s) for s in e["shape"]], int(e["nbytes"])
        except (KeyError, TypeError, ValueError) as err:
            raise PayloadError(f"bad buffer entry {e!r}: {err}") from None
        numel = 1
        for s in shape:
            if s < 0:
                raise PayloadError(f"buffer {name!r} has a negative dimension {shape}")
            numel *= s
        expected = numel * torch.empty((), dtype=dtype).element_size()
        if nbytes != expected:
            raise PayloadError(f"buffer {name!r}: {nbytes} bytes but shape {shape} of {e['dtype']} needs {expected}")
        if offset + nbytes > end:
            raise PayloadError(f"buffer {name!r} runs past the end of the payload: truncated")
        raw = bytearray(payload[offset : offset + nbytes])
        offset += nbytes
        flat = torch.frombuffer(raw, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        buffers.append(Buffer(name, flat.view(dtype).reshape(shape)))
    if offset != end:
        raise PayloadError(f"{end - offset} unexpected trailing bytes after the last buffer")
    return buffers, meta
