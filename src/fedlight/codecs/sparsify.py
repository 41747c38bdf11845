"""Sparsification: send ``k = max(1, round(density * numel))`` values per tensor, with their indices.

``topk`` keeps the largest magnitudes (Aji & Heafield 2017), ``randk`` a uniformly random subset
(Stich et al. 2018). Neither rescales what it keeps, so both are contractive but biased: use them with
``error_feedback: true`` so what is dropped is sent in later rounds. Values travel as fp32; indices
as sorted absolute positions in the smallest integer dtype that holds ``numel - 1`` (uint8, int16,
int32, int64), so a decoder can check them (in range, strictly increasing, exactly ``k``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from fedlight.codecs import wire
from fedlight.codecs.base import Codec, expected_spec
from fedlight.codecs.quantize import derived_generator, expect, group_buffers, read_shape, shape_spec, shape_tensor
from fedlight.core.state import State
from fedlight.hookspecs import hookimpl


def index_dtype(numel: int) -> torch.dtype:
    """The smallest integer dtype the wire format carries that holds every index of ``numel`` values."""
    for dtype, limit in ((torch.uint8, 2**8), (torch.int16, 2**15), (torch.int32, 2**31)):
        if numel <= limit:
            return dtype
    return torch.int64


class _Sparsifier(Codec):
    """Shared wire layout of the sparse codecs; subclasses choose the indices."""

    max_rel_error = 1.0  # a dropped value is at most max|x|, and with density < 1 values are dropped

    def __init__(self, density: float = 0.01, error_feedback: bool = False) -> None:
        super().__init__(error_feedback=error_feedback)
        if not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
            raise ValueError(
                f"{self.name}.density must be in (0, 1] (the fraction of values sent, e.g. 0.01), got {density!r}"
            )
        self.density = float(density)

    def num_kept(self, numel: int) -> int:
        return 0 if numel == 0 else min(numel, max(1, round(self.density * numel)))

    def wire_params(self) -> dict[str, Any]:
        return {"density": self.density}

    def select(self, name: str, flat: torch.Tensor, k: int) -> torch.Tensor:
        raise NotImplementedError

    def to_buffers(self, state: State) -> list[wire.Buffer]:
        out: list[wire.Buffer] = []
        for name, value in state.items():
            flat = value.detach().to("cpu", torch.float32).reshape(-1)
            idx = torch.sort(self.select(name, flat, self.num_kept(flat.numel()))).values
            out += [
                wire.Buffer(f"{name}#i", idx.to(index_dtype(flat.numel()))),
                wire.Buffer(f"{name}#v", flat[idx]),
                wire.Buffer(f"{name}#shape", shape_tensor(value.shape)),
            ]
        return out

    def layout(self, reference: wire.Spec) -> list[wire.BufferSpec]:
        out: list[wire.BufferSpec] = []
        for k, s in reference.items():
            kept = (self.num_kept(s.numel),)
            out += [
                wire.BufferSpec(f"{k}#i", index_dtype(s.numel), kept),
                wire.BufferSpec(f"{k}#v", torch.float32, kept),
                shape_spec(k, s.shape),
            ]
        return out

    def from_buffers(
        self, buffers: list[wire.Buffer], meta: dict[str, Any], reference: wire.Spec | None = None
    ) -> State:
        if meta.get("density") != self.density:
            raise wire.PayloadError(
                f"{self.name} payload has density={meta.get('density')!r}, this codec is configured with {self.density!r}"
            )
        state: State = {}
        for name, parts in group_buffers(buffers, ("i", "v", "shape"), self.name).items():
            shape, numel = read_shape(parts["shape"], f"{name} shape", expected_spec(reference, name, self.name))
            k = self.num_kept(numel)
            expect(parts["i"], index_dtype(numel), (k,), f"{name} indices")
            expect(parts["v"], torch.float32, (k,), f"{name} values")
            idx = parts["i"].to(torch.int64)
            if k and (int(idx[0]) < 0 or int(idx[-1]) >= numel or not bool((idx[1:] > idx[:-1]).all())):
                raise wire.PayloadError(f"{name}: indices must be strictly increasing within [0, {numel})")
            flat = torch.zeros(numel, dtype=torch.float32)
            flat[idx] = parts["v"]
            state[name] = flat.reshape(shape)
        return state


class TopKCodec(_Sparsifier):
    """Top-k sparsification: the largest |values| per tensor, density*(4 + index bytes) bytes/param."""

    name = "topk"
    example_args: ClassVar[dict[str, Any]] = {"density": 0.1}

    def __init__(self, density: float = 0.01, error_feedback: bool = False) -> None:
        """``density``: fraction of each tensor's values sent, in (0, 1]."""
        super().__init__(density=density, error_feedback=error_feedback)

    def select(self, name: str, flat: torch.Tensor, k: int) -> torch.Tensor:
        return torch.topk(flat.abs(), k, sorted=False).indices


class RandomKCodec(_Sparsifier):
    """Random-k sparsification: a seeded random subset per tensor, density*(4 + index bytes) bytes/param."""

    name = "randk"
    example_args: ClassVar[dict[str, Any]] = {"density": 0.1, "seed": 1}

    def __init__(self, density: float = 0.01, seed: int = 0, error_feedback: bool = False) -> None:
        """``density``: fraction of each tensor's values sent, in (0, 1]; ``seed``: with the tensor's
        name and contents it picks the subset, so an encode is reproducible without a counter."""
        super().__init__(density=density, error_feedback=error_feedback)
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"randk.seed must be a non-negative integer, got {seed!r}")
        self.seed = seed

    def select(self, name: str, flat: torch.Tensor, k: int) -> torch.Tensor:
        return torch.randperm(flat.numel(), generator=derived_generator(self.seed, name, flat))[:k]


@hookimpl
def fedlight_codecs() -> list[type]:
    return [TopKCodec, RandomKCodec]
