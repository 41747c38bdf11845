"""The attack plugin kind."""

from __future__ import annotations

from typing import Any

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

    def poison_batch(self, batch: dict[str, Any], num_classes: int) -> dict[str, Any]:
        return batch

    def poison_updates(self, deltas: list[State], num_clients: int, generator: torch.Generator) -> list[State]:
        return deltas
