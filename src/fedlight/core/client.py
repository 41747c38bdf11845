"""The client pipeline: receive the global state, and turn local training into an encoded update.

Engine-independent: it knows nothing about Lightning's loop or Flower; it only maps
(global payload, trained tensors) to a :class:`ClientUpdate`.
"""

from __future__ import annotations

from typing import Any

import torch

from fedlight.codecs.base import Codec
from fedlight.core.state import State, add, subtract
from fedlight.core.update import ClientUpdate
from fedlight.privacy.base import Privacy

#: one client's persistent state between rounds, by purpose: "local" (tensors that never leave the
#: client), "residual" (codec error feedback), and whatever client-side methods need (e.g. "control")
ClientState = dict[str, State]


class ClientPipeline:
    def __init__(self, uplink: Codec, downlink: Codec, privacy: Privacy) -> None:
        self.uplink = uplink
        self.downlink = downlink
        self.privacy = privacy
        #: why the last :meth:`finish` sent nothing (None: it sent, or the round as a whole failed)
        self.refusal: str | None = None
        #: the tensors the last :meth:`finish` encoded, when decoding its payload gives them back bit for bit
        #: (a ``passthrough`` uplink on fp32 tensors): an in-process server may use them instead of decoding
        self.sent_state: State | None = None

    def begin_round(self, engine: Any, round: Any) -> None:
        """Round start (the engine and its ``RoundState``); the plain pipeline has nothing to set up."""

    def receive(self, payload: bytes) -> State:
        """Decode the broadcast: this, not the server's copy, is what the client starts from."""
        return self.downlink.decode(payload)

    def finish(
        self,
        client_id: int,
        start: State,
        trained: State,
        num_examples: int,
        generator: torch.Generator,
        client_state: ClientState,
        metrics: dict[str, float] | None = None,
    ) -> ClientUpdate | None:
        """Delta -> privacy -> (error feedback) -> encode.

        ``client_state`` is this client's entry in the client-state store; a lossy codec with
        ``error_feedback`` keeps its residual there (``"residual"``), so what was lost this round is
        sent next round and the transmitted sum tracks the true sum.
        """
        self.sent_state = None
        delta = self.privacy.client_transform(subtract(trained, start), generator)
        if self.uplink.error_feedback:
            residual = client_state.get("residual")
            corrected = delta if residual is None else add(delta, residual)
            payload = self.uplink.encode(corrected)
            client_state["residual"] = subtract(corrected, self.uplink.decode(payload))
        else:
            payload = self.uplink.encode(delta)
            lossless = self.uplink.passthrough and all(v.dtype == torch.float32 for v in delta.values())
            self.sent_state = delta if lossless else None
        return ClientUpdate(client_id, num_examples, payload, dict(metrics or {}))
