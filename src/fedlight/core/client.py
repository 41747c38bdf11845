"""The client pipeline: receive the global state, and turn local training into an encoded update.

Engine-independent: it knows nothing about Lightning's loop or Flower; it only maps
(global payload, trained tensors) to a :class:`ClientUpdate`.
"""

from __future__ import annotations

import torch

from fedlight.codecs.base import Codec
from fedlight.core.state import State, subtract
from fedlight.core.update import ClientUpdate
from fedlight.privacy.base import Privacy


class ClientPipeline:
    def __init__(self, uplink: Codec, downlink: Codec, privacy: Privacy) -> None:
        self.uplink = uplink
        self.downlink = downlink
        self.privacy = privacy

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
        metrics: dict[str, float] | None = None,
    ) -> ClientUpdate:
        delta = self.privacy.client_transform(subtract(trained, start), generator)
        return ClientUpdate(client_id, num_examples, self.uplink.encode(delta), dict(metrics or {}))
