"""Symmetric linear quantisation: int8 and 4-bit codes with per-tensor, per-channel or per-block scales.

Each group of values (the whole tensor, one row along dim 0, or ``block_size`` consecutive values)
gets one fp32 scale ``s = max|x| / qmax`` and integer codes ``q = round(x / s)`` in ``[-qmax, qmax]``
(``qmax`` = 127 for int8, 7 for 4-bit); the decoder returns ``q * s`` in fp32. Round-to-nearest errs
by at most ``s/2`` (``max|x|/254`` or ``max|x|/14``); stochastic rounding (``floor(x/s + u)``,
``u ~ U[0,1)``) is unbiased and errs by less than ``s``. Its randomness is a pure function of
``(seed, tensor name, tensor contents)``, so an encode is reproducible with no counter to checkpoint.

This module also holds the small per-tensor buffer helpers the sparse codecs share.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from typing import Any, ClassVar, Literal

import torch

from fedlight.codecs import wire
from fedlight.codecs.base import Codec, expected_spec
from fedlight.core.state import State
from fedlight.hookspecs import hookimpl

Granularity = Literal["tensor", "channel", "block"]
GRANULARITIES = ("tensor", "channel", "block")

# ---------------------------------------------------------------------------------------------
# Per-tensor buffer groups: tensor ``w`` travels as buffers ``w#<part>``, in a fixed part order
# ---------------------------------------------------------------------------------------------


def group_buffers(buffers: list[wire.Buffer], parts: tuple[str, ...], codec: str) -> dict[str, dict[str, torch.Tensor]]:
    """Regroup ``<tensor>#<part>`` buffers per tensor; each tensor must have exactly ``parts``, in order."""
    if len(buffers) % len(parts):
        raise wire.PayloadError(f"{codec} payload has {len(buffers)} buffers; expected {len(parts)} per tensor {parts}")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for i in range(0, len(buffers), len(parts)):
        chunk = buffers[i : i + len(parts)]
        name, _, _ = chunk[0].name.rpartition("#")
        for buf, part in zip(chunk, parts, strict=True):
            if buf.name != f"{name}#{part}":
                raise wire.PayloadError(f"{codec} payload: buffer {buf.name!r} where {name + '#' + part!r} is expected")
        if name in out:
            raise wire.PayloadError(f"{codec} payload: tensor {name!r} appears twice")
        out[name] = {part: buf.tensor for buf, part in zip(chunk, parts, strict=True)}
    return out


def expect(
    t: torch.Tensor, dtypes: torch.dtype | tuple[torch.dtype, ...], shape: tuple[int, ...] | None, what: str
) -> None:
    """Raise PayloadError unless ``t`` has one of ``dtypes`` (and ``shape``, when given)."""
    dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
    if t.dtype not in dtypes:
        raise wire.PayloadError(f"{what}: dtype {t.dtype} where {' or '.join(map(str, dtypes))} is expected")
    if shape is not None and tuple(t.shape) != shape:
        raise wire.PayloadError(f"{what}: shape {tuple(t.shape)} where {shape} is expected")


def shape_tensor(shape: torch.Size) -> torch.Tensor:
    return torch.tensor(list(shape), dtype=torch.int64)


def shape_spec(name: str, shape: tuple[int, ...]) -> wire.BufferSpec:
    """The layout entry of the int64 vector a tensor's shape travels as."""
    return wire.BufferSpec(f"{name}#shape", torch.int64, (len(shape),))


def read_shape(t: torch.Tensor, what: str, expected: wire.TensorSpec | None = None) -> tuple[tuple[int, ...], int]:
    """A shape sent as an int64 vector, checked (against ``expected`` when known) before anything is
    allocated from it: returns (shape, numel)."""
    expect(t, torch.int64, None, what)
    if t.dim() != 1 or t.numel() > wire.MAX_RANK:
        raise wire.PayloadError(
            f"{what}: a shape must be an int64 vector of at most {wire.MAX_RANK} dims, got shape {tuple(t.shape)}"
        )
    shape = tuple(int(s) for s in t.tolist())
    if expected is not None and shape != expected.shape:
        raise wire.PayloadError(f"{what}: {shape} where the global state has {expected.shape}")
    if any(s < 0 for s in shape):
        raise wire.PayloadError(f"{what}: negative dimension in {shape}")
    if math.prod(max(s, 1) for s in shape) > wire.MAX_NUMEL:  # a zero dimension must not hide the others
        raise wire.PayloadError(f"{what}: {shape} has more elements than any update (corrupt payload)")
    return shape, math.prod(shape)


def check_params(meta: dict[str, Any], expected: dict[str, Any], codec: str) -> None:
    """The header's codec parameters must be this decoder's own: a mismatch is a misconfiguration or corruption."""
    for key, value in expected.items():
        if meta.get(key) != value:
            raise wire.PayloadError(
                f"{codec} payload has {key}={meta.get(key)!r}, this codec is configured with {value!r}"
            )


def derived_generator(seed: int, name: str, x: torch.Tensor) -> torch.Generator:
    """A generator seeded from (seed, tensor name, CRC32 of the fp32 contents): reproducible and stateless."""
    crc = (
        zlib.crc32(x.detach().to("cpu", torch.float32).contiguous().reshape(-1).view(torch.uint8).numpy().data)
        if x.numel()
        else 0
    )
    digest = hashlib.blake2b(f"{seed}\0{name}\0{crc}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


# ---------------------------------------------------------------------------------------------
# Quantisation
# ---------------------------------------------------------------------------------------------


def num_scales(shape: tuple[int, ...], granularity: str, block_size: int) -> int:
    """How many scales a tensor of ``shape`` carries (0 for an empty tensor)."""
    numel = math.prod(shape)
    if numel == 0:
        return 0
    if granularity == "channel" and len(shape) >= 2:
        return shape[0]
    if granularity == "block":
        return -(-numel // block_size)
    return 1


def _groups(x: torch.Tensor, granularity: str, block_size: int) -> torch.Tensor:
    """``x`` as a (groups, group size) matrix, zero-padded for blocks."""
    flat = x.reshape(-1)
    rows = num_scales(tuple(x.shape), granularity, block_size)
    if granularity == "block":
        pad = rows * block_size - flat.numel()
        return torch.nn.functional.pad(flat, (0, pad)).reshape(rows, block_size)
    return flat.reshape(rows, -1)


def quantize(
    x: torch.Tensor, qmax: int, granularity: str, block_size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (int8, shape of ``x``) and fp32 scales; stochastic rounding when a generator is given."""
    x = x.detach().to("cpu", torch.float32)
    if x.numel() == 0:
        return torch.zeros(x.shape, dtype=torch.int8), torch.zeros(0, dtype=torch.float32)
    g = _groups(x, granularity, block_size)
    scales = g.abs().amax(dim=1) / qmax
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero group has codes 0
    y = g / safe[:, None]
    y = torch.floor(y + torch.rand(y.shape, generator=generator)) if generator is not None else torch.round(y)
    codes = y.nan_to_num(0.0).clamp_(-qmax, qmax).to(torch.int8)  # NaN/Inf show up in the scale instead
    return codes.reshape(-1)[: x.numel()].reshape(x.shape), scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, granularity: str, block_size: int) -> torch.Tensor:
    """fp32 ``codes * scale`` per group; ``codes`` has the tensor's shape."""
    if codes.numel() == 0:
        return torch.zeros(codes.shape, dtype=torch.float32)
    g = _groups(codes.to(torch.float32), granularity, block_size)
    return (g * scales[:, None]).reshape(-1)[: codes.numel()].reshape(codes.shape)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Codes in [-7, 7] -> bytes holding two codes + 8 each (low nibble first); an odd tail pads with 0."""
    u = (codes.reshape(-1).to(torch.int16) + 8).to(torch.uint8)
    if u.numel() % 2:
        u = torch.cat([u, torch.zeros(1, dtype=torch.uint8)])
    return u[0::2] | (u[1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, numel: int, what: str) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`; nibble 0 (code -8) and a non-zero pad nibble are corruption."""
    u = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)
    if u.numel() > numel and int(u[numel:].sum()) != 0:
        raise wire.PayloadError(f"{what}: the padding nibble of an odd-length tensor is not zero")
    u = u[:numel]
    if bool((u == 0).any()):
        raise wire.PayloadError(f"{what}: 4-bit code 0 is outside the symmetric range [1, 15]")
    return (u.to(torch.int16) - 8).to(torch.int8)


class _LinearQuantizer(Codec):
    """Shared encode/decode of the int8 and 4-bit codecs; subclasses set ``bits``, ``qmax`` and the packing."""

    bits: int = 8
    qmax: int = 127

    def __init__(
        self,
        granularity: Granularity = "tensor",
        block_size: int = 64,
        stochastic: bool = False,
        seed: int = 0,
        error_feedback: bool = False,
    ) -> None:
        super().__init__(error_feedback=error_feedback)
        if granularity not in GRANULARITIES:
            raise ValueError(f"{self.name}.granularity must be one of {list(GRANULARITIES)}, got {granularity!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"{self.name}.block_size must be a positive integer (e.g. 64), got {block_size!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"{self.name}.seed must be a non-negative integer, got {seed!r}")
        self.granularity = granularity
        self.block_size = block_size
        self.stochastic = stochastic
        self.seed = seed

    def wire_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"bits": self.bits, "granularity": self.granularity}
        if self.granularity == "block":
            params["block_size"] = self.block_size
        return params

    def _quantize(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        generator = derived_generator(self.seed, name, x) if self.stochastic else None
        return quantize(x, self.qmax, self.granularity, self.block_size, generator)

    def _check_scales(self, scales: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
        expect(scales, torch.float32, (num_scales(shape, self.granularity, self.block_size),), f"{name} scales")
        if bool((scales < 0).any()):
            raise wire.PayloadError(f"{name}: negative quantisation scale")


class Int8Codec(_LinearQuantizer):
    """int8 linear quantisation: ~1 byte/param, error <= max|x|/254 (nearest) or < max|x|/127 (stochastic)."""

    name = "int8"
    bits, qmax = 8, 127
    #: the bound over every configuration: stochastic rounding errs by < one step s = max|x|/127
    max_rel_error = 1 / 127
    example_args: ClassVar[dict[str, Any]] = {"granularity": "channel"}

    def __init__(
        self,
        granularity: Granularity = "tensor",
        block_size: int = 64,
        stochastic: bool = False,
        seed: int = 0,
        error_feedback: bool = False,
    ) -> None:
        """``granularity``: one scale per tensor, per row along dim 0 (tensors of 2+ dims; others get one),
        or per ``block_size`` consecutive values; ``stochastic``: unbiased rounding seeded by ``seed``."""
        super().__init__(granularity, block_size, stochastic, seed, error_feedback)

    def to_buffers(self, state: State) -> list[wire.Buffer]:
        out: list[wire.Buffer] = []
        for name, value in state.items():
            codes, scales = self._quantize(name, value)
            out += [wire.Buffer(f"{name}#q", codes), wire.Buffer(f"{name}#s", scales)]
        return out

    def layout(self, reference: wire.Spec) -> list[wire.BufferSpec]:
        return [
            b
            for k, s in reference.items()
            for b in (
                wire.BufferSpec(f"{k}#q", torch.int8, s.shape),
                wire.BufferSpec(f"{k}#s", torch.float32, (num_scales(s.shape, self.granularity, self.block_size),)),
            )
        ]

    def from_buffers(
        self, buffers: list[wire.Buffer], meta: dict[str, Any], reference: wire.Spec | None = None
    ) -> State:
        check_params(meta, self.wire_params(), self.name)
        state: State = {}
        for name, parts in group_buffers(buffers, ("q", "s"), self.name).items():
            codes, scales = parts["q"], parts["s"]
            expect(codes, torch.int8, None, f"{name} codes")
            if bool((codes == -128).any()):
                raise wire.PayloadError(f"{name}: int8 code -128 is outside the symmetric range [-127, 127]")
            self._check_scales(scales, tuple(codes.shape), name)
            state[name] = dequantize(codes, scales, self.granularity, self.block_size)
        return state


class Int4Codec(_LinearQuantizer):
    """4-bit linear quantisation, two codes per byte: ~0.5 byte/param + scales, error <= max|x|/14."""

    name = "int4"
    bits, qmax = 4, 7
    #: the bound over every configuration: stochastic rounding errs by < one step s = max|x|/7
    max_rel_error = 1 / 7
    example_args: ClassVar[dict[str, Any]] = {"granularity": "block", "block_size": 16}

    def __init__(
        self,
        granularity: Granularity = "block",
        block_size: int = 64,
        stochastic: bool = False,
        seed: int = 0,
        error_feedback: bool = False,
    ) -> None:
        """``granularity``: one scale per tensor, per row along dim 0 (tensors of 2+ dims; others get one),
        or per ``block_size`` consecutive values; ``stochastic``: unbiased rounding seeded by ``seed``."""
        super().__init__(granularity, block_size, stochastic, seed, error_feedback)

    def to_buffers(self, state: State) -> list[wire.Buffer]:
        out: list[wire.Buffer] = []
        for name, value in state.items():
            codes, scales = self._quantize(name, value)
            out += [
                wire.Buffer(f"{name}#q", pack_nibbles(codes)),
                wire.Buffer(f"{name}#s", scales),
                wire.Buffer(f"{name}#shape", shape_tensor(value.shape)),
            ]
        return out

    def layout(self, reference: wire.Spec) -> list[wire.BufferSpec]:
        return [
            b
            for k, s in reference.items()
            for b in (
                wire.BufferSpec(f"{k}#q", torch.uint8, ((s.numel + 1) // 2,)),
                wire.BufferSpec(f"{k}#s", torch.float32, (num_scales(s.shape, self.granularity, self.block_size),)),
                shape_spec(k, s.shape),
            )
        ]

    def from_buffers(
        self, buffers: list[wire.Buffer], meta: dict[str, Any], reference: wire.Spec | None = None
    ) -> State:
        check_params(meta, self.wire_params(), self.name)
        state: State = {}
        for name, parts in group_buffers(buffers, ("q", "s", "shape"), self.name).items():
            shape, numel = read_shape(parts["shape"], f"{name} shape", expected_spec(reference, name, self.name))
            expect(parts["q"], torch.uint8, ((numel + 1) // 2,), f"{name} packed codes")
            self._check_scales(parts["s"], shape, name)
            codes = unpack_nibbles(parts["q"], numel, name).reshape(shape)
            state[name] = dequantize(codes, parts["s"], self.granularity, self.block_size)
        return state


@hookimpl
def fedlight_codecs() -> list[type]:
    return [Int8Codec, Int4Codec]
