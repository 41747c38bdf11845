"""The client-method plugin kind: what a client changes in its local training, and what extra travels.

A client method is called at four points of a round (``FederatedRound`` is the only caller):

* round start, on the server: :meth:`ClientMethod.broadcast` returns extra tensors sent to every
  sampled client with the global state (e.g. SCAFFOLD's server control ``c``); they are encoded
  with the downlink codec and their bytes are counted as downlink, per client;
* client start: :meth:`ClientMethod.start_client` receives the decoded global state, the decoded
  extra tensors and the client's entry in the client-state store;
* before every local optimizer step: :meth:`ClientMethod.correct_gradients` may change the
  gradients of the trainable shared tensors (an objective term ``R(w)`` is applied as ``g += ∇R(w)``,
  which is exactly what autograd would add to the gradient of ``loss + R(w)``);
* client end: :meth:`ClientMethod.finish_client` returns extra tensors sent up with the update
  (e.g. SCAFFOLD's control delta ``Δc_i``), encoded with the uplink codec and counted as uplink;
* round end, on the server: :meth:`ClientMethod.server_update` sees the extra tensors of the clients
  whose model updates were accepted.

Per-client state lives in the client-state store (checkpointed with the round); server-side state is
the method's ``state_dict()`` (checkpointed too). A method only ever sees the *shared trainable*
tensors (``names`` given to :meth:`bind`): local tensors never leave the client and have no global
reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from fedlight.core.plugin_base import Plugin
from fedlight.core.state import State

#: one client's entry in the client-state store (purpose -> named tensors)
ClientState = dict[str, State]


class ClientMethod(Plugin):
    """Base class: local training as plain FedAvg (no extra term, nothing extra travels)."""

    #: True when the method sends tensors besides the model delta (they bypass client-side privacy,
    #: so the round refuses such a method together with a privacy mechanism)
    sends_extra: ClassVar[bool] = False
    #: False when the correction can move coordinates a client must keep at its start value (e.g. the
    #: zero-padded ranks of HetLoRA/FlexLoRA client views); the round refuses such a pairing
    respects_client_views: ClassVar[bool] = True

    def bind(self, names: list[str], num_clients: int) -> None:
        """Called once before training: the shared trainable tensor names and the population size."""
        self.names = list(names)
        self.num_clients = num_clients

    def broadcast(self, global_state: State) -> State:
        """Extra tensors the server sends to every sampled client this round (default: none)."""
        return {}

    def start_client(self, client_id: int, start: State, received: State, client_state: ClientState) -> None:
        """A client begins local training from ``start`` (the decoded global state)."""

    def correct_gradients(self, params: Mapping[str, torch.nn.Parameter], lr: float) -> None:
        """Change ``params[name].grad`` in place before an optimizer step (``lr``: the step's learning rate)."""

    def finish_client(self, client_id: int, start: State, trained: State, client_state: ClientState) -> State:
        """The client is done; return the extra tensors it sends up with its update (default: none)."""
        return {}

    def server_update(self, extras: list[tuple[int, State]]) -> None:
        """Round end on the server: ``(client_id, decoded extras)`` of every accepted update."""


def check_nonnegative(value: float, field: str) -> float:
    if not value >= 0.0:
        raise ValueError(f"{field} must be >= 0, got {value}")
    return float(value)
