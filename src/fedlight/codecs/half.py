"""Half-precision codecs: fp16 (with an exact per-tensor power-of-two scale) and bf16 casts.

Both halve the bytes of fp32 and decode to fp32. fp16 has only five exponent bits, so a plain cast
flushes the small deltas of a low learning rate to zero (below 6e-8) and overflows above 65504; a
per-tensor power-of-two scale, which is exact, moves each tensor's largest value into fp16's top
binade first. bf16 keeps fp32's exponent range and needs no scale, but keeps 3 fewer mantissa bits.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from fedlight.codecs import wire
from fedlight.codecs.base import Codec
from fedlight.core.state import State
from fedlight.hookspecs import hookimpl

#: fp32 exponents lie in [-149, 128]; anything far outside is a corrupt payload, not a scale
_MAX_ABS_EXPONENT = 400


def _expect(t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...] | None, what: str) -> None:
    if t.dtype != dtype:
        raise wire.PayloadError(f"{what}: dtype {t.dtype} where {dtype} is expected")
    if shape is not None and tuple(t.shape) != shape:
        raise wire.PayloadError(f"{what}: shape {tuple(t.shape)} where {shape} is expected")


class Fp16Codec(Codec):
    """fp16 with an exact per-tensor power-of-two scale: 2 bytes/param, error <= 2^-11 of max|x|."""

    name = "fp16"
    #: round-to-nearest in fp16 after scaling max|x| into [2^14, 2^15): unit roundoff 2^-11, no underflow
    max_rel_error = 2.0**-11
    example_args: ClassVar[dict[str, Any]] = {}

    def __init__(self, error_feedback: bool = False) -> None:
        super().__init__(error_feedback=error_feedback)

    def to_buffers(self, state: State) -> list[wire.Buffer]:
        out: list[wire.Buffer] = []
        for name, value in state.items():
            x = value.detach().to("cpu", torch.float64)  # fp64: the scaling below is then exact
            amax = x.abs().max() if x.numel() else torch.zeros((), dtype=torch.float64)
            if bool(torch.isfinite(amax)) and float(amax) > 0:
                # amax = m * 2^E, m in [0.5, 1): dividing by 2^(E-15) puts amax in [2^14, 2^15)
                exponent = int(torch.frexp(amax).exponent) - 15
            else:  # zeros need no scale; NaN/Inf travel as they are and the server rejects them
                exponent = 0
            data = (x * 2.0**-exponent).to(torch.float16)
            out += [wire.Buffer(f"{name}#h", data), wire.Buffer(f"{name}#e", torch.tensor(exponent, dtype=torch.int16))]
        return out

    def layout(self, reference: wire.Spec) -> list[wire.BufferSpec]:
        return [
            b
            for k, s in reference.items()
            for b in (wire.BufferSpec(f"{k}#h", torch.float16, s.shape), wire.BufferSpec(f"{k}#e", torch.int16, ()))
        ]

    def from_buffers(
        self, buffers: list[wire.Buffer], meta: dict[str, Any], reference: wire.Spec | None = None
    ) -> State:
        if len(buffers) % 2:
            raise wire.PayloadError(
                f"fp16 payload has {len(buffers)} buffers; expected a (data, exponent) pair per tensor"
            )
        state: State = {}
        for data, exp in zip(buffers[0::2], buffers[1::2], strict=True):
            name, sep, part = data.name.rpartition("#")
            if not sep or part != "h" or exp.name != f"{name}#e":
                raise wire.PayloadError(
                    f"fp16 payload: buffers {data.name!r}, {exp.name!r} are not a '<name>#h', '<name>#e' pair"
                )
            if name in state:
                raise wire.PayloadError(f"fp16 payload: tensor {name!r} appears twice")
            _expect(data.tensor, torch.float16, None, f"{name} data")
            _expect(exp.tensor, torch.int16, (), f"{name} exponent")
            exponent = int(exp.tensor)
            if abs(exponent) > _MAX_ABS_EXPONENT:
                raise wire.PayloadError(f"{name}: scale exponent {exponent} is out of range (corrupt payload)")
            state[name] = (data.tensor.to(torch.float64) * 2.0**exponent).to(torch.float32)
        return state


class Bf16Codec(Codec):
    """bf16 cast: 2 bytes/param, fp32's exponent range, error <= 2^-8 of max|x|."""

    name = "bf16"
    #: round-to-nearest-even to 8 significant bits: |error| <= 2^-8 |x| <= 2^-8 max|x|
    max_rel_error = 2.0**-8
    example_args: ClassVar[dict[str, Any]] = {}

    def __init__(self, error_feedback: bool = False) -> None:
        super().__init__(error_feedback=error_feedback)

    def to_buffers(self, state: State) -> list[wire.Buffer]:
        return [wire.Buffer(name, value.detach().to("cpu").float().to(torch.bfloat16)) for name, value in state.items()]

    def layout(self, reference: wire.Spec) -> list[wire.BufferSpec]:
        return [wire.BufferSpec(k, torch.bfloat16, s.shape) for k, s in reference.items()]

    def from_buffers(
        self, buffers: list[wire.Buffer], meta: dict[str, Any], reference: wire.Spec | None = None
    ) -> State:
        state: State = {}
        for buf in buffers:
            if buf.name in state:
                raise wire.PayloadError(f"bf16 payload: tensor {buf.name!r} appears twice")
            _expect(buf.tensor, torch.bfloat16, None, buf.name)
            state[buf.name] = buf.tensor.float()
        return state


@hookimpl
def fedlight_codecs() -> list[type]:
    return [Fp16Codec, Bf16Codec]
