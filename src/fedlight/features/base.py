"""The round-feature kind: behaviour that joins every round at fixed points, with its own state.

A feature is how fedlight grows without growing the engine: attacks, client methods, merging into
the base, personalised evaluation and the privacy-budget stop are each one module of
``fedlight.features``; a third-party feature is one class registered through the
``fedlight_round_features`` hook and listed in ``federation.features``. The engine
(:class:`fedlight.core.engine.RoundEngine`) calls, in order of the feature list:

=================  ==============================================================================
``bind``           once, after the population is known (before round 1)
``attach``         once, when the model exists (fresh run or resumed)
``on_round_start`` server side, after the round is planned: extra payloads go in ``round.broadcasts[key]``
``on_client_start`` client side, after the start state is loaded (read ``round.broadcasts``, count bytes)
``on_batch``       before each local forward pass (the batch may be changed in place)
``on_gradients``   after each local backward pass, before the optimizer step
``hold_update``    when a client finishes: True keeps its update back (sent later by the feature)
``on_client_end``  after a client's update was sent (extras go in ``update.extras[key]``)
``before_aggregate`` before the server pipeline runs (late sends)
``screen``         server side: refuse updates whose extras cannot be used (never raises)
``on_aggregated``  after the server pipeline (``changed``: the global model moves this round)
``round_metrics``  values for the round's row in rounds.csv
``stop_reason``    after each round: a reason to stop the run, or None
``round_part``     (several processes) this process's share of the round's scratch state, merged on
                   every process by ``merge_round_parts`` before ``before_aggregate``
=================  ==============================================================================

State: ``state_dict`` / ``load_state_dict`` under the feature's own ``key`` in the round checkpoint.
A checkpoint written before the feature existed resumes with ``empty_state()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from fedlight.core.plugin_base import Plugin
from fedlight.core.state import State

if TYPE_CHECKING:
    from fedlight.core.engine import ClientRun, RoundEngine, RoundState
    from fedlight.core.server import AggregationReport
    from fedlight.core.update import ClientUpdate


class RoundFeature(Plugin):
    """Base class: a feature that does nothing at any point (override the points you need)."""

    #: checkpoint key of this feature's state (defaults to its name)
    key: ClassVar[str] = ""
    #: True when the feature acts inside local training (batches or gradients): an engine that does
    #: not run Lightning's step loop must call ``on_batch`` / ``on_gradients`` itself
    acts_in_local_training: ClassVar[bool] = False
    #: True when a server-side point (``round_metrics``, ``on_aggregated``, …) reads ``engine.client_store``
    #: (e.g. clients' local tensors): an engine whose clients keep their own state (Flower) refuses it
    reads_client_store: ClassVar[bool] = False
    #: False when the feature keeps state of *the* current client between its local-training points
    #: (e.g. a client method's anchor): grouped execution, which interleaves the steps of several
    #: clients, then runs the round's clients one after another instead
    groupable: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("key"):
            cls.key = cls.name

    def bind(self, engine: RoundEngine) -> None:
        """The population is known (``engine.population``, ``engine.data``)."""

    def attach(self, engine: RoundEngine) -> None:
        """The model exists (``engine.module``); raise ValueError if the feature cannot work with it."""

    def on_round_start(self, engine: RoundEngine, round: RoundState) -> None:
        """The round is planned and the global state encoded (``round.payload``)."""

    def on_client_start(self, engine: RoundEngine, client: ClientRun) -> None:
        """A client starts local training from ``client.start``."""

    def on_batch(self, engine: RoundEngine, client: ClientRun, batch: dict[str, Any]) -> None:
        """A local batch, before the forward pass."""

    def on_gradients(self, engine: RoundEngine, client: ClientRun, lr: float) -> None:
        """Gradients of a local step are in the model's ``.grad``; the optimizer (learning rate ``lr``) steps next."""

    def hold_update(self, engine: RoundEngine, client: ClientRun, trained: State) -> bool:
        """True to keep the client's update back (the feature sends it later with ``engine.send``)."""
        return False

    def on_client_end(
        self, engine: RoundEngine, client: ClientRun, trained: State, update: ClientUpdate | None
    ) -> None:
        """The client's update was sent (None: the client pipeline declined); extras go in ``update.extras``."""

    def before_aggregate(self, engine: RoundEngine, round: RoundState) -> None:
        """Every client is done; late updates are sent now (``engine.send``)."""

    def screen(self, engine: RoundEngine, round: RoundState) -> None:
        """Server side, before aggregation: move updates this feature cannot use from ``round.updates``
        to ``round.rejected`` (with the reason) — e.g. extras that do not decode. Never raise for an update."""

    def on_aggregated(self, engine: RoundEngine, round: RoundState, report: AggregationReport, changed: bool) -> None:
        """The server pipeline ran; ``changed``: the new global state replaces the old one."""

    def round_metrics(self, engine: RoundEngine, round: RoundState) -> dict[str, float]:
        """Values for this round's row in rounds.csv."""
        return {}

    def stop_reason(self, engine: RoundEngine) -> str | None:
        """A reason to stop the run after this round, or None."""
        return None

    def round_part(self, engine: RoundEngine, round: RoundState) -> Any:
        """This process's share of the feature's round scratch state, when a round's clients are spread over
        processes (DDP ranks); every process then gets all shares in :meth:`merge_round_parts`."""
        return None

    def merge_round_parts(self, engine: RoundEngine, round: RoundState, parts: list[Any]) -> None:
        """Every process's :meth:`round_part` (in rank order), before ``before_aggregate``."""

    def frozen_changes(self) -> State:
        """Changes this feature made to frozen weights (exports must carry them), by parameter name."""
        return {}

    def empty_state(self) -> dict[str, Any]:
        """The state of a run that never had this feature (resuming an older checkpoint)."""
        return {}
