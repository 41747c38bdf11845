"""Identity codec: fp32 tensors sent as they are."""

from __future__ import annotations

from typing import Any

import torch

from fedlight.codecs import wire
from fedlight.codecs.base import Codec
from fedlight.core.state import State
from fedlight.hookspecs import hookimpl


class IdentityCodec(Codec):
    """Lossless fp32: the reference every other codec is measured against."""

    name = "identity"
    passthrough = True

    def to_buffers(self, state: State) -> list[wire.Buffer]:
        return [wire.Buffer(k, v.detach().to(torch.float32)) for k, v in state.items()]

    def layout(self, reference: wire.Spec) -> list[wire.BufferSpec]:
        return [wire.BufferSpec(k, torch.float32, s.shape) for k, s in reference.items()]

    def from_buffers(
        self, buffers: list[wire.Buffer], meta: dict[str, Any], reference: wire.Spec | None = None
    ) -> State:
        for b in buffers:
            if b.tensor.dtype != torch.float32:
                raise wire.PayloadError(f"identity payload: {b.name!r} has dtype {b.tensor.dtype}, not float32")
        return {b.name: b.tensor for b in buffers}


@hookimpl
def fedlight_codecs() -> list[type]:
    return [IdentityCodec]
