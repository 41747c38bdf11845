"""The codec plugin kind."""

from __future__ import annotations

from typing import Any, ClassVar

from fedlight.codecs import wire
from fedlight.core.plugin_base import Plugin
from fedlight.core.state import State


class Codec(Plugin):
    """Base class: encode named tensors to bytes and decode them back.

    Subclasses implement :meth:`to_buffers` / :meth:`from_buffers`; framing, validation and the
    pickle-free format live in :mod:`fedlight.codecs.wire`, written once. ``max_rel_error`` is the
    documented bound on ``|decode(encode(x)) - x| / max|x|`` the contract test checks.
    ``error_feedback`` (used on the uplink) makes the client pipeline carry what the codec lost
    into the next round, for any lossy codec (Seide et al. 2014; Karimireddy et al. 2019).
    """

    max_rel_error: ClassVar[float] = 0.0

    def __init__(self, error_feedback: bool = False) -> None:
        self.error_feedback = error_feedback

    def encode(self, state: State) -> bytes:
        return wire.pack(self.to_buffers(state), {"codec": self.name, **self.wire_params()})

    def decode(self, payload: bytes) -> State:
        buffers, meta = wire.unpack(payload)
        if meta.get("codec") != self.name:
            raise wire.PayloadError(f"payload was encoded by codec {meta.get('codec')!r}, not {self.name!r}")
        return self.from_buffers(buffers, meta)

    def wire_params(self) -> dict[str, Any]:
        """Codec parameters written into the header (JSON-serialisable)."""
        return {}

    def to_buffers(self, state: State) -> list[wire.Buffer]:
        raise NotImplementedError

    def from_buffers(self, buffers: list[wire.Buffer], meta: dict[str, Any]) -> State:
        raise NotImplementedError
