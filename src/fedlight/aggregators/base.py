"""The aggregator plugin kind."""

from __future__ import annotations

from fedlight.core.plugin_base import Plugin
from fedlight.core.state import State
from fedlight.core.update import DecodedUpdate


class Aggregator(Plugin):
    """Base class: ``aggregate(global, updates) -> new global``.

    Client sampling and the round loop are not an aggregator's business (unlike Flower's Strategy):
    it sees exactly the validated updates of one round. Server-optimizer state goes in
    ``state_dict()`` so it is checkpointed with the round.
    """

    def aggregate(self, global_state: State, updates: list[DecodedUpdate]) -> State:
        raise NotImplementedError
