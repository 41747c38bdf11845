"""The attack plugin kind."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from fedlight.core.plugin_base import Plugin
from fedlight.core.state import State


class Attack(Plugin):
    """Base class: what the malicious clients of a round do.

    ``poison_batch`` changes a malicious client's training data (data poisoning);
    ``poison_updates`` replaces the honest deltas the malicious clients computed this round with
    what they send (all attackers collude, so attacks like ALIE can use their joint statistics).
    ``num_clients`` is the number of clients whose updates the server will aggregate this round.
    """

    #: True when ``poison_updates`` needs the round's attackers jointly (their deltas' statistics, or
    #: one random stream drawn in turn by all of them): no attacker can craft its update alone, so an
    #: engine whose clients run in separate processes (Flower) refuses it. False: each crafted update
    #: is a function of that attacker's own delta only.
    colludes: ClassVar[bool] = True

    def poison_batch(self, batch: dict[str, Any], num_classes: int) -> dict[str, Any]:
        return batch

    def poison_updates(self, deltas: list[State], num_clients: int, generator: torch.Generator) -> list[State]:
        return deltas
