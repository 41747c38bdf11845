"""The aggregator plugin kind."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from fedlight.core.plugin_base import Plugin
from fedlight.core.state import State, weighted_sum
from fedlight.core.update import DecodedUpdate


class Aggregator(Plugin):
    """Base class: ``aggregate(global, updates) -> new global``.

    Client sampling and the round loop are not an aggregator's business (unlike Flower's Strategy):
    it sees exactly the validated updates of one round. Server-optimizer state goes in
    ``state_dict()`` so it is checkpointed with the round.
    """

    #: True when the aggregator needs the model's LoRA layout: the round loop calls :meth:`bind_lora`
    #: with :func:`fedlight.peft.lora_variants.lora_layout` before round 1 (a non-LoRA model fails then)
    needs_lora: ClassVar[bool] = False
    #: True when :meth:`aggregate_with_base` may also change frozen base weights (FedEx-LoRA, FLoRA)
    merges_into_base: ClassVar[bool] = False
    #: True when the aggregator needs only the mean of the deltas (not each update), so it can run on a
    #: secure sum (``core.compat``); such an aggregator has a ``weighting`` attribute
    sum_based: ClassVar[bool] = False
    #: True when clients train a restricted view of the global state (:meth:`client_view` overridden,
    #: e.g. per-client LoRA ranks)
    per_client_views: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "per_client_views" not in cls.__dict__ and cls.client_view is not Aggregator.client_view:
            cls.per_client_views = True  # declared by overriding client_view

    def uniform_mean(self) -> bool:
        """True when the new global state is the old one plus the *unweighted* mean of the deltas."""
        return False

    def aggregate(self, global_state: State, updates: list[DecodedUpdate]) -> State:
        raise NotImplementedError

    def aggregate_with_base(self, global_state: State, updates: list[DecodedUpdate]) -> tuple[State, State]:
        """``(new global state, base delta)``: what the server pipeline calls.

        The base delta maps frozen base-weight names to additive changes; it is empty unless
        ``merges_into_base``. The round loop applies it to the frozen weights, checkpoints the merged
        weights and counts its encoded bytes as downlink (every client must receive it).
        """
        return self.aggregate(global_state, updates), {}

    def bind_lora(self, pairs: list) -> None:
        """Receive the model's LoRA layout (a list of ``LoraPair``); only called when ``needs_lora``."""

    def client_view(self, global_state: State, client_id: int) -> State:
        """What client ``client_id`` starts its round from (e.g. the global LoRA truncated to its rank)."""
        return global_state


WEIGHTINGS = ("examples", "uniform")


def check_weighting(weighting: str, who: str) -> str:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"{who} weighting must be 'examples' or 'uniform', got {weighting!r}")
    return weighting


def client_weights(updates: Sequence[DecodedUpdate], weighting: str, who: str) -> list[float]:
    """Normalised client weights: ``n_k / Σ n`` for ``examples`` (McMahan et al. 2017), ``1/K`` for ``uniform``."""
    if not updates:
        raise ValueError(f"{who} needs at least one update")
    raw = [float(u.num_examples) if weighting == "examples" else 1.0 for u in updates]
    if any(w < 0 for w in raw):
        raise ValueError(f"{who}: negative num_examples in an update")
    total = sum(raw)
    if total <= 0:
        raise ValueError(f"{who}: all client weights are zero")
    return [w / total for w in raw]


def weighted_mean_delta(updates: Sequence[DecodedUpdate], weighting: str, who: str) -> State:
    """FedAvg's mean of the client deltas (fp64 accumulation, fp32 result): the pseudo-gradient Δ."""
    return weighted_sum((u.delta for u in updates), client_weights(updates, weighting, who))
