"""A FedAvg variant with a server learning rate, shipped as a third-party plugin.

Imported only when a config uses it: ``hooks.py`` (the entry point) registers it as
``"fedlight_example.plugin:ServerLRFedAvg"``, so listing plugins does not pay for torch.
"""

from __future__ import annotations

from fedlight import Aggregator, DecodedUpdate, State, add, weighted_sum


class ServerLRFedAvg(Aggregator):
    """FedAvg with a server step size: global + server_lr * example-weighted mean delta."""

    name = "server_lr_fedavg"
    example_args = {"server_lr": 0.5}

    def __init__(self, server_lr: float = 1.0) -> None:
        if server_lr <= 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        self.server_lr = server_lr

    def aggregate(self, global_state: State, updates: list[DecodedUpdate]) -> State:
        total = sum(u.num_examples for u in updates)
        step = weighted_sum((u.delta for u in updates), (self.server_lr * u.num_examples / total for u in updates))
        return add(global_state, step)
