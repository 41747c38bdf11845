"""The codec plugin kind."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from fedlight.codecs import wire
from fedlight.core.plugin_base import Plugin
from fedlight.core.state import State

#: what a receiver may decode against: a spec, or a state whose names and shapes are the reference
Reference = Mapping[str, wire.TensorSpec] | Mapping[str, torch.Tensor]

#: a header budget when the codec cannot say its exact layout: this much per tensor, plus its name
_HEADER_BYTES_PER_TENSOR = 2048


def as_spec(reference: Reference | None) -> dict[str, wire.TensorSpec] | None:
    """``reference`` as a spec; a state's tensors give their shapes and decode to fp32 (deltas travel in fp32)."""
    if reference is None:
        return None
    return {
        k: v if isinstance(v, wire.TensorSpec) else wire.TensorSpec(tuple(v.shape), torch.float32)
        for k, v in reference.items()
    }


class Codec(Plugin):
    """Base class: encode named tensors to bytes and decode them back.

    Subclasses implement :meth:`to_buffers` / :meth:`from_buffers`; framing, validation and the
    pickle-free format live in :mod:`fedlight.codecs.wire`, written once. ``max_rel_error`` is the
    documented bound on ``|decode(encode(x)) - x| / max|x|`` the contract test checks.
    ``error_feedback`` (used on the uplink) makes the client pipeline carry what the codec lost
    into the next round, for any lossy codec (Seide et al. 2014; Karimireddy et al. 2019).

    Decoding against a ``reference`` (the server passes the global state) checks the payload
    against what a legitimate encoding of tensors of those names and shapes can be, before any
    buffer is allocated: the exact buffer :meth:`layout` when the codec declares one, the decoded
    names, shapes and dtypes in any case. A codec whose ``from_buffers`` allocates from sizes found
    in the data (a shape buffer) should accept ``reference`` and check them against it first.
    """

    max_rel_error: ClassVar[float] = 0.0
    #: True when the codec sends fp32 tensors as they are (nothing lost or compressed), so a protocol
    #: that bypasses codecs (secure aggregation's masked ring vectors) loses nothing (``core.compat``)
    passthrough: ClassVar[bool] = False
    #: whether this class's ``from_buffers`` takes the ``reference`` argument (set per subclass)
    _takes_reference: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._takes_reference = "reference" in inspect.signature(cls.from_buffers).parameters

    def __init__(self, error_feedback: bool = False) -> None:
        self.error_feedback = error_feedback

    def encode(self, state: State) -> bytes:
        return wire.pack(self.to_buffers(state), self.meta())

    def meta(self) -> dict[str, Any]:
        """The header's codec metadata: the codec's name and its :meth:`wire_params`."""
        return {"codec": self.name, **self.wire_params()}

    def decode(self, payload: bytes, reference: Reference | None = None) -> State:
        """Named fp32 tensors from ``payload``; anything malformed raises :class:`wire.PayloadError`.

        With ``reference``, the payload must be a legitimate encoding of exactly those tensors, in
        that order, with those shapes, decoding to those dtypes.
        """
        spec = as_spec(reference)
        layout = self.layout(spec) if spec is not None else None
        if spec is None:
            max_header = wire.MAX_HEADER_BYTES
        elif layout is not None:
            max_header = 2 * len(wire.header_bytes(layout, self.meta())) + 1024  # slack: say what differs
        else:
            max_header = 4096 + sum(_HEADER_BYTES_PER_TENSOR + 12 * len(k) for k in spec)
        buffers, meta = wire.unpack(payload, layout, max_header, expected_meta=self.meta())
        state = (
            self.from_buffers(buffers, meta, reference=spec)
            if self._takes_reference
            else self.from_buffers(buffers, meta)
        )
        if spec is not None:
            check_decoded(state, spec)
        return state

    def layout(self, reference: wire.Spec) -> list[wire.BufferSpec] | None:
        """The exact buffers a legitimate payload of tensors shaped like ``reference`` carries, in order.

        None (the default) when the codec cannot say (e.g. a compressed stream's length depends on
        the data): decoding then checks what it can, and :meth:`max_payload_bytes` is a generous bound.
        """
        return None

    def max_payload_bytes(self, reference: wire.Spec) -> int:
        """The longest payload a legitimate encoding of tensors shaped like ``reference`` can be.

        Exact when :meth:`layout` is known; otherwise 8 bytes per value (fp64) plus a header budget,
        which any codec that does not expand its input stays below.
        """
        layout = self.layout(reference)
        if layout is not None:
            return wire.payload_size(layout, self.meta())
        header = 4096 + sum(_HEADER_BYTES_PER_TENSOR + 12 * len(k) for k in reference)
        return wire.framed_size(header, sum(8 * s.numel + 64 for s in reference.values()))

    def wire_params(self) -> dict[str, Any]:
        """Codec parameters written into the header (JSON-serialisable)."""
        return {}

    def to_buffers(self, state: State) -> list[wire.Buffer]:
        raise NotImplementedError

    def from_buffers(
        self, buffers: list[wire.Buffer], meta: dict[str, Any], reference: wire.Spec | None = None
    ) -> State:
        raise NotImplementedError


def check_decoded(state: State, spec: wire.Spec) -> None:
    """The decoded tensors are exactly the reference's: same names in the same order, shapes and dtypes."""
    if list(state) != list(spec):
        missing = [k for k in spec if k not in state][:5]
        extra = [k for k in state if k not in spec][:5]
        raise wire.PayloadError(
            f"decoded tensor names differ from the global state (missing {missing}, unexpected {extra}"
            + (", or in another order)" if not missing and not extra else ")")
        )
    for name, value in state.items():
        want = spec[name]
        if tuple(value.shape) != want.shape:
            raise wire.PayloadError(f"{name}: decoded shape {tuple(value.shape)} != global {want.shape}")
        if value.dtype != want.dtype:
            raise wire.PayloadError(
                f"{name}: decoded dtype {value.dtype} != {want.dtype} (the global state's delta dtype)"
            )


def expected_spec(reference: wire.Spec | None, name: str, what: str) -> wire.TensorSpec | None:
    """The reference's spec of tensor ``name`` (None without a reference); PayloadError if it has none."""
    if reference is None:
        return None
    try:
        return reference[name]
    except KeyError:
        raise wire.PayloadError(f"{what}: tensor {name[:80]!r} is not in the global state") from None
