"""RoundEngine: one federated round as plain method calls, with no Lightning in it.

An engine drives it (the Lightning callback in ``core/round.py``, the Flower apps in fedlight-flower)::

    round = engine.begin_round(r)            # plan + broadcast payloads
    for client in round.plan.training:       # however the engine runs them
        engine.start_client(client)          # the decoded broadcast (+ local tensors) loaded into the model
        ... local steps: engine.on_batch(batch), engine.on_gradients(lr), engine.record_loss(loss)
        engine.finish_client()               # -> the client's ClientUpdate (or None)
    report = engine.end_round()              # server pipeline -> new global state
    row = engine.round_row(val_metrics)      # the rounds.csv row, with every feature's metrics

The engine owns the global state, the client-state store and the history; everything else that
happens in a round is a :class:`~fedlight.features.base.RoundFeature` run at fixed points, and the
per-update work is the client and server pipelines (secure aggregation is a pipeline variant).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from fedlight.core.client import ClientPipeline, ClientState
from fedlight.core.faults import ClientFaults, TooFewClientsError
from fedlight.core.plan import RoundPlan, plan_round
from fedlight.core.seeds import Stream, resolve_seed, round_generator
from fedlight.core.server import AggregationReport, ServerPipeline
from fedlight.core.state import State
from fedlight.core.update import ClientUpdate
from fedlight.errors import CheckpointError
from fedlight.peft.lora_variants import lora_layout
from fedlight.privacy.base import Privacy, RunSpec

MB = 1e6


@dataclass(frozen=True)
class Population:
    """What the engine knows about the federation's data: each client's size, and the batch size."""

    client_sizes: tuple[int, ...]
    batch_size: int

    @property
    def num_clients(self) -> int:
        return len(self.client_sizes)


@dataclass(frozen=True)
class Schedule:
    """The ``federation:`` options that decide who trains for how long (the round plan's inputs)."""

    rounds: int
    clients_per_round: int
    local_steps: int | None
    local_epochs: float | None
    faults: ClientFaults = field(default_factory=ClientFaults)
    client_sampling: str = "uniform"
    seed: int | None = None
    compute_tiers: Any = None  # per-client compute budgets (``ComputeTiers``), assigned once at bind

    def steps_for(self, size: int, batch_size: int) -> int:
        """The most local steps a client of ``size`` examples takes in a round it is sampled in."""
        if self.local_steps is not None:
            steps = self.local_steps
        else:
            assert self.local_epochs is not None
            steps = max(1, math.ceil(self.local_epochs * size / batch_size))
        deadline = self.faults.deadline_steps
        return min(steps, deadline) if deadline else steps


@dataclass
class RoundState:
    """The scratch state of the round in progress (a value object; nothing here is checkpointed)."""

    plan: RoundPlan
    payload: bytes
    started: float = field(default_factory=time.perf_counter)
    #: what the server sends to every sampled client besides ``payload``, by feature key (e.g. SCAFFOLD's c)
    broadcasts: dict[str, bytes] = field(default_factory=dict)
    updates: list[ClientUpdate] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    #: updates a feature refused before aggregation (e.g. undecodable extras), with the reason
    rejected: dict[int, str] = field(default_factory=dict)
    downlink: int = 0
    losses: list[float] = field(default_factory=list)
    #: each finished client's local losses (what ``losses`` concatenates, in finishing order)
    client_losses: dict[int, list[float]] = field(default_factory=dict)
    clients_done: int = 0
    #: ``payload`` decoded once per round (every client of the round receives the same bytes)
    received: State | None = None
    report: AggregationReport | None = None
    skipped: str | None = None  # why the global model did not change this round
    metrics: dict[str, float] = field(default_factory=dict)  # features' per-round values

    @property
    def round(self) -> int:
        return self.plan.round


@dataclass
class ClientRun:
    """The client that is training now."""

    client_id: int
    start: State  # the decoded broadcast (the client's view of the global state)
    losses: list[float] = field(default_factory=list)

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / max(len(self.losses), 1)


class RoundEngine:
    """Global state, client store and history of a run, and the round's steps as method calls.

    ``module`` is the model every client trains in this process (a ``FederatedModule``: ``peft``,
    ``model``, ``shared_names``, ``local_names``); ``features`` run in order at every point.
    """

    def __init__(
        self,
        schedule: Schedule,
        client: ClientPipeline,
        server: ServerPipeline,
        privacy: Privacy,
        features: list[Any] | None = None,
    ) -> None:
        self.schedule = schedule
        self.client = client
        self.server = server
        self.privacy = privacy
        self.features = list(features or [])
        self.step_scale: list[float] | None = None
        self.seed = resolve_seed(schedule.seed)
        self.module: Any = None
        self.data: Any = None
        self._population: Population | None = None
        # run state (checkpointed)
        self._global_state: State | None = None
        self.initial_local: State = {}
        self.client_store: dict[int, ClientState] = {}
        self.history: list[dict[str, Any]] = []
        #: True in a client-only process (a Flower ClientApp): its model is not the server's
        self.remote_client = False
        # the round and client in progress
        self._round: RoundState | None = None
        self.current: ClientRun | None = None
        #: the model's shared / local tensor names, read once at :meth:`attach` (they never change in a run)
        self.shared_names: list[str] = []
        self.local_names: list[str] = []

    # the run's state, set once the run is bound/attached (accessing it earlier is a programming error)

    @property
    def population(self) -> Population:
        assert self._population is not None, "RoundEngine.bind() sets the population before round 1"
        return self._population

    @property
    def global_state(self) -> State:
        assert self._global_state is not None, "RoundEngine.attach() (or load_state_dict) sets the global state"
        return self._global_state

    @global_state.setter
    def global_state(self, state: State) -> None:
        self._global_state = state

    @property
    def round(self) -> RoundState:
        """The round in progress (see :attr:`in_round` for "is there one")."""
        assert self._round is not None, "no round in progress: begin_round() / receive_round() first"
        return self._round

    @property
    def in_round(self) -> RoundState | None:
        return self._round

    @property
    def client_run(self) -> ClientRun:
        assert self.current is not None, "no client is training: start_client() first"
        return self.current

    # --- run set-up ----------------------------------------------------------------------------

    def bind(self, population: Population, data: Any = None) -> None:
        """The federation's population (and its data module, for features that evaluate per client)."""
        self._population, self.data = population, data
        if self.schedule.compute_tiers is not None:
            self.step_scale = self.schedule.compute_tiers.assign(population.num_clients, self.seed)
        self.privacy.bind_run(self.run_spec())
        for feature in self.features:
            feature.bind(self)

    def run_spec(self) -> RunSpec:
        pop, s = self.population, self.schedule
        steps = tuple(s.steps_for(n, pop.batch_size) for n in pop.client_sizes)
        return RunSpec(
            pop.num_clients, s.clients_per_round, s.rounds, pop.batch_size, pop.client_sizes, steps,
            s.client_sampling, s.faults.min_clients,
        )  # fmt: skip

    def attach(self, module: Any) -> None:
        """The model this process trains: a fresh run reads its initial state from it."""
        from fedlight.core import compat  # base-model rules (quantized base) need task, PEFT method and aggregator

        compat.check_model(module.task, module.peft, module.model, self.server.aggregator)
        self.module = module
        self.shared_names, self.local_names = list(module.shared_names), list(module.local_names)
        if self._global_state is None:
            self.global_state = module.peft.get_state(module.model, self.shared_names)
            self.initial_local = module.peft.get_state(module.model, self.local_names)
        else:
            self._check_resumed_state(module)
        try:
            self.privacy.check_model(module.model)
        except ValueError as err:
            raise ValueError(f"federation.privacy: {err}") from err
        module.private_step = getattr(self.privacy, "private_step", None) if self.privacy.per_sample else None
        aggregator = self.server.aggregator
        if aggregator.needs_lora:  # LoRA-aware aggregation: the pairs whose A and B both travel
            shared = set(module.shared_names)
            try:
                aggregator.bind_lora([p for p in lora_layout(module.model) if p.a in shared and p.b in shared])
            except ValueError as err:
                raise ValueError(f"federation.aggregator {aggregator.name!r}: {err}") from err
        for feature in self.features:
            feature.attach(self)

    def _check_resumed_state(self, module: Any) -> None:
        """A checkpoint from another config fails here, before any round runs or anything is written."""
        params = dict(module.model.named_parameters())
        if list(self.global_state) != module.shared_names:
            raise CheckpointError(
                "checkpoint does not match this config: it ships tensors "
                f"{sorted(set(self.global_state) ^ set(module.shared_names))[:5]} that this model does not "
                "(different peft method, targets or model?); resume with the config that wrote it"
            )
        for name, value in self.global_state.items():
            if value.shape != params[name].shape:
                raise CheckpointError(
                    f"checkpoint does not match this config: {name} has shape {tuple(value.shape)}, "
                    f"the model has {tuple(params[name].shape)}"
                )

    def plan_for(self, round_idx: int) -> RoundPlan:
        s, pop = self.schedule, self.population
        return plan_round(
            self.seed, round_idx, pop.client_sizes, s.clients_per_round, pop.batch_size, s.local_steps,
            s.local_epochs, s.faults.dropout_before, s.faults.dropout_after, s.faults.deadline_steps,
            s.faults.straggler_policy, s.client_sampling, self.step_scale,
            # Poisson cohorts / independent batches only when the privacy accounting assumes them
            s.clients_per_round / pop.num_clients if self.privacy.cohort_sampling == "poisson" else None,
            self.privacy.batch_sampling,
        )  # fmt: skip

    def generator(self, stream: Stream, client: int = 0) -> torch.Generator:
        return round_generator(self.seed, self.round.round, stream, client)

    # --- the round ------------------------------------------------------------------------------

    def begin_round(self, round_idx: int) -> RoundState:
        """Plan the round and encode the broadcast (features add their own payloads)."""
        plan = self.plan_for(round_idx)
        self._round = RoundState(plan, self.server.broadcast(self.global_state))
        self.client.begin_round(self, self.round)
        for feature in self.features:
            feature.on_round_start(self, self.round)
        return self.round

    def receive_round(self, plan: RoundPlan, payload: bytes, broadcasts: dict[str, bytes] | None = None) -> RoundState:
        """Client side of a remote engine (Flower's ClientApp): the round as the server's message describes it.

        The client process holds no server state: ``payload`` and ``broadcasts`` are what the
        server's :meth:`begin_round` produced; then :meth:`start_client` / :meth:`finish_client` run as
        in-process. ``remote_client`` tells features that this process's model is not the server's.
        """
        self.remote_client = True
        self._round = RoundState(plan, payload, broadcasts=dict(broadcasts or {}))
        return self.round

    def start_client(self, client_id: int) -> ClientRun:
        """Load what client ``client_id`` receives into the model; fresh optimizer state is the caller's."""
        r = self.round
        if r.received is None:  # decoded once: the same bytes decode to the same tensors for every client
            r.received = self.client.receive(r.payload)
        # a new dict over the shared decoded tensors: nothing writes into a client's start state in place
        start = self.server.aggregator.client_view(dict(r.received), client_id)
        r.downlink += len(r.payload)
        self.current = ClientRun(client_id, start)
        peft, model = self.module.peft, self.module.model
        peft.set_state(model, start)
        local = self.client_store.get(client_id, {}).get("local", self.initial_local)
        if local:
            peft.set_state(model, local)
        self.privacy.on_client_start(client_id, self.generator(Stream.LOCAL_TRAINING, client_id))
        for feature in self.features:
            feature.on_client_start(self, self.current)
        return self.current

    def suspend_client(self) -> ClientRun:
        """Set the current client aside (grouped execution starts several before any finishes)."""
        run, self.current = self.client_run, None
        return run

    def resume_client(self, run: ClientRun) -> None:
        """Make a suspended client current again (its batches, gradients or :meth:`finish_client` come next)."""
        assert self.current is None, f"client {self.current.client_id if self.current else None} is still current"
        self.current = run

    def on_batch(self, batch: dict[str, Any]) -> None:
        """A local batch of the current client, before its forward pass (features may change it)."""
        for feature in self.features:
            feature.on_batch(self, self.current, batch)

    def on_gradients(self, lr: float) -> None:
        """Gradients of a local step are in ``.grad``; the optimizer (learning rate ``lr``) applies them next."""
        if self.current is None:
            return
        for feature in self.features:
            feature.on_gradients(self, self.current, lr)

    def record_loss(self, loss: float) -> None:
        self.client_run.losses.append(loss)

    def client_failed(self, client_id: int, error: str) -> bool:
        """A client's local training raised: it is excluded from this round (True the first time)."""
        if client_id in self.round.failed:
            return False
        self.round.failed[client_id] = error
        return True

    def finish_client(self) -> ClientUpdate | None:
        """The current client is done: its update, or None (lost, crashed, or held back by a feature)."""
        run, r = self.client_run, self.round
        self.current = None
        r.clients_done += 1
        r.losses.extend(run.losses)
        r.client_losses[run.client_id] = run.losses
        if run.client_id in r.failed or run.client_id in r.plan.lost:
            return None  # a crashed client, or one whose update never arrives
        module = self.module
        trained = module.peft.get_state(module.model, self.shared_names)
        for feature in self.features:
            if feature.hold_update(self, run, trained):
                return None  # e.g. a malicious client: the attack sends for it at round end
        update = self.send(run.client_id, run.start, trained, {"train_loss": run.mean_loss})
        for feature in self.features:
            feature.on_client_end(self, run, trained, update)
        if self.local_names:
            self.client_store[run.client_id]["local"] = module.peft.get_state(module.model, self.local_names)
        return update

    def send(self, client_id: int, start: State, trained: State, metrics: dict[str, float]) -> ClientUpdate | None:
        """The client pipeline: delta -> privacy -> codec (or the secure variant's masked vector)."""
        client_state = self.client_store.setdefault(client_id, {})
        update = self.client.finish(
            client_id,
            start,
            trained,
            num_examples=self.population.client_sizes[client_id],
            generator=self.generator(Stream.CLIENT, client_id),
            client_state=client_state,
            metrics=metrics,
        )
        if update is None:
            if self.client.refusal:  # the client pipeline declined to send (not a protocol-wide failure)
                self.round.failed[client_id] = self.client.refusal
        else:
            if self.client.sent_state is not None:  # lossless in-process: the server need not decode it
                self.server.remember(update.payload, self.client.sent_state)
            self.round.updates.append(update)
        return update

    def round_part(self) -> dict[str, Any]:
        """What this process's clients produced this round, for an engine spread over processes (DDP ranks):
        every rank's parts merged with :meth:`merge_round_parts` make each rank's round the one-process round."""
        r = self.round
        trained = list(r.client_losses)
        return {
            "updates": r.updates, "failed": r.failed, "rejected": r.rejected, "losses": r.client_losses,
            "downlink": r.downlink, "clients_done": r.clients_done,
            "store": {c: self.client_store[c] for c in trained if c in self.client_store},
            "features": {f.key: f.round_part(self, r) for f in self.features},
        }  # fmt: skip

    def merge_round_parts(self, parts: list[dict[str, Any]]) -> None:
        """Every process's :meth:`round_part` (this one's included), in plan order as one process would have them."""
        r = self.round
        position = {c: i for i, c in enumerate(r.plan.training)}
        r.updates = sorted((u for p in parts for u in p["updates"]), key=lambda u: position.get(u.client_id, -1))
        losses = {c: ls for p in parts for c, ls in p["losses"].items()}
        r.client_losses = {c: losses[c] for c in sorted(losses, key=lambda c: position.get(c, -1))}
        r.losses = [loss for ls in r.client_losses.values() for loss in ls]
        r.failed = {c: e for p in parts for c, e in p["failed"].items()}
        r.rejected = {c: e for p in parts for c, e in p["rejected"].items()}
        r.downlink = sum(p["downlink"] for p in parts)
        r.clients_done = sum(p["clients_done"] for p in parts)
        for p in parts:
            self.client_store.update(p["store"])
        for feature in self.features:
            feature.merge_round_parts(self, r, [p["features"][feature.key] for p in parts])

    def end_round(self) -> RoundState:
        """The server pipeline on the round's updates; the new global state is loaded into the model."""
        r = self.round
        for feature in self.features:
            feature.before_aggregate(self, r)  # late sends (colluding attackers)
        sent = list(r.updates)
        for feature in self.features:
            feature.screen(self, r)  # a feature may refuse an update whose extras it cannot use
        new_global, report = self.server.aggregate(self.global_state, r.updates, self.generator(Stream.SERVER))
        screened = [u for u in sent if u.client_id in r.rejected]
        report.uplink_bytes += sum(u.num_bytes for u in screened) + sum(u.extra_bytes for u in sent)
        report.rejected.update(r.rejected)
        r.downlink += report.downlink_bytes  # e.g. secure aggregation's survivor list
        self.privacy.on_round_end()  # charged because clients were queried, whatever arrived
        r.report = report
        min_clients = self.schedule.faults.min_clients
        if report.skipped:  # the server pipeline refused to apply the aggregate (e.g. not finite)
            r.skipped = report.skipped
            new_global = self.global_state
        elif self.skips_round(len(report.accepted)):
            r.skipped = f"{len(report.accepted)} accepted updates < federation.faults.min_clients ({min_clients})"
            if self.schedule.faults.on_too_few_clients == "stop":
                raise TooFewClientsError(
                    f"round {r.round}: {r.skipped}; stopping (resume from the last round checkpoint)"
                )
            new_global = self.global_state
        for feature in self.features:
            feature.on_aggregated(self, r, report, changed=r.skipped is None)
        self.global_state = new_global
        self.module.peft.set_state(self.module.model, new_global)
        if self.initial_local:
            self.module.peft.set_state(self.module.model, self.initial_local)
        return r

    def skips_round(self, accepted: int) -> bool:
        """Too few accepted updates (``faults.min_clients``): the round leaves the global state unchanged.

        Never under a Poisson-cohort privacy mechanism: it releases every round (an empty cohort is
        noise only), and skipping would make the release depend on the data.
        """
        return accepted < self.schedule.faults.min_clients and self.privacy.cohort_sampling != "poisson"

    def round_row(self, metrics: dict[str, float]) -> dict[str, Any]:
        """The round's rounds.csv row (validation ``metrics`` from the engine's evaluation), appended to history."""
        r = self.round
        report = r.report
        assert report is not None, "round_row() comes after end_round()"
        for feature in self.features:
            r.metrics.update(feature.round_metrics(self, r))
        row = {
            "round": r.round,
            "num_clients": len(report.accepted),
            "rejected": len(report.rejected),
            "dropped": len(r.plan.dropped_before) + len(set(r.plan.lost) - set(r.failed)) - r.plan.placeholder,
            "failed": len(r.failed),
            "uplink_bytes": report.uplink_bytes,
            "downlink_bytes": r.downlink,
            "train_loss": sum(r.losses) / max(len(r.losses), 1),
            **metrics,
            **r.metrics,
            "epsilon": self.privacy.epsilon(),
            **self.privacy.metrics(),
            "round_time_s": round(time.perf_counter() - r.started, 3),
        }
        self.append_row(row)
        return row

    def append_row(self, row: dict[str, Any]) -> None:
        row.setdefault("uplink_bytes", 0)
        row.setdefault("downlink_bytes", 0)
        self.history.append(row)
        cumulative = 0
        for h in self.history:
            cumulative += h["uplink_bytes"] + h["downlink_bytes"]
            h["cumulative_mb"] = round(cumulative / MB, 6)

    def stop_reason(self) -> str | None:
        """Why the run must stop after this round (a feature's reason, e.g. the privacy budget), if any."""
        for feature in self.features:
            reason = feature.stop_reason(self)
            if reason:
                return reason
        return None

    def feature(self, key: str) -> Any:
        """The feature with this checkpoint key, or None."""
        return next((f for f in self.features if f.key == key), None)

    def frozen_changes(self) -> State:
        """Every change features made to frozen base weights (e.g. merged LoRA), summed by name."""
        changes: State = {}
        for feature in self.features:
            for name, delta in feature.frozen_changes().items():
                changes[name] = changes[name] + delta if name in changes else delta
        return changes

    @property
    def total_uplink(self) -> int:
        return sum(r["uplink_bytes"] for r in self.history)

    @property
    def total_downlink(self) -> int:
        return sum(r["downlink_bytes"] for r in self.history)

    # --- checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (loadable with ``weights_only=True``); one key per feature."""
        state = {
            "global_state": self.global_state,
            "initial_local": self.initial_local,
            "client_store": self.client_store,
            "history": self.history,
            "aggregator": self.server.aggregator.state_dict(),
            "privacy": self.privacy.state_dict(),
            "codecs": {"uplink": self.client.uplink.state_dict(), "downlink": self.client.downlink.state_dict()},
        }
        for feature in self.features:
            state[feature.key] = feature.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_state = state["global_state"]
        self.initial_local = state["initial_local"]
        self.client_store = state["client_store"]
        self.history = state["history"]
        self.server.aggregator.load_state_dict(state["aggregator"])
        self.privacy.load_state_dict(state["privacy"])
        self.client.uplink.load_state_dict(state["codecs"]["uplink"])
        self.client.downlink.load_state_dict(state["codecs"]["downlink"])
        for feature in self.features:
            feature.load_state_dict(state.get(feature.key, feature.empty_state()))
