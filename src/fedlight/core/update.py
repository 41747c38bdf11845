"""What crosses the client -> server boundary."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedlight.core.state import State


@dataclass(frozen=True)
class ClientUpdate:
    """An encoded update as it leaves a client: only bytes and counts, never live tensors."""

    client_id: int
    num_examples: int
    payload: bytes
    metrics: dict[str, float] = field(default_factory=dict)
    #: what round features send beside the update, by feature key (e.g. SCAFFOLD's control delta)
    extras: dict[str, bytes] = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        return len(self.payload)

    @property
    def extra_bytes(self) -> int:
        return sum(len(p) for p in self.extras.values())


@dataclass
class DecodedUpdate:
    """A validated update on the server: the client's delta (local - global) in fp32."""

    client_id: int
    num_examples: int
    delta: State
