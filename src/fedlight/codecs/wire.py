"""A self-describing, pickle-free wire format for named tensors.

Layout: ``MAGIC`` (4 bytes) | header length (uint32 little-endian) | UTF-8 JSON header | raw buffers.
The header names the codec and its parameters and lists, per buffer, the name, dtype, shape and byte
length, so any process with fedlight can decode a payload and check it before trusting it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import torch

MAGIC = b"FLW1"
_HEADER_LEN = struct.Struct("<I")
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
    """A payload is truncated, oversized or inconsistent with its own header."""


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
    return b"".join([MAGIC, _HEADER_LEN.pack(len(header)), header, *blobs])


def unpack(payload: bytes) -> tuple[list[Buffer], dict[str, Any]]:
    """Parse a payload, validating every length against the header before touching the data."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise PayloadError(f"payload must be bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    if len(payload) < len(MAGIC) + _HEADER_LEN.size or payload[:4] != MAGIC:
        raise PayloadError("not a fedlight payload (bad magic or truncated before the header)")
    (hlen,) = _HEADER_LEN.unpack_from(payload, 4)
    start = 4 + _HEADER_LEN.size
    if hlen > MAX_HEADER_BYTES or start + hlen > len(payload):
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
        if offset + nbytes > len(payload):
            raise PayloadError(f"buffer {name!r} runs past the end of the payload: truncated")
        raw = bytearray(payload[offset : offset + nbytes])
        offset += nbytes
        flat = torch.frombuffer(raw, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        buffers.append(Buffer(name, flat.view(dtype).reshape(shape)))
    if offset != len(payload):
        raise PayloadError(f"{len(payload) - offset} unexpected trailing bytes after the last buffer")
    return buffers, meta
