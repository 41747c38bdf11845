"""FederatedRound: the callback that turns a Lightning epoch into one federated round.

round start : plan (sampled clients, local steps); broadcast the global trainable state
client start: load the decoded broadcast (+ the client's own local tensors); fresh optimizer state
client end  : delta -> client pipeline (privacy, codec) -> ClientUpdate; keep local tensors
round end   : server pipeline -> new global state, loaded before validation; a row in rounds.csv
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from fedlight.aggregators.base import Aggregator
from fedlight.aggregators.fedavg import FedAvg
from fedlight.attacks.base import Attack
from fedlight.client_methods.base import ClientMethod
from fedlight.codecs.base import Codec
from fedlight.codecs.identity import IdentityCodec
from fedlight.core.checkpoint import AtomicCheckpointIO, CheckpointError, atomic_copy, capture_rng, restore_rng
from fedlight.core.client import ClientPipeline, ClientState
from fedlight.core.datamodule import FederatedDataModule, resolve_seed
from fedlight.core.export import export_adapter
from fedlight.core.faults import ClientFaults, TooFewClientsError
from fedlight.core.heterogeneity import ComputeTiers, check_sampling
from fedlight.core.manifest import build_manifest, format_manifest, write_manifest
from fedlight.core.module import FederatedModule
from fedlight.core.personal import accuracy_key, label_matched_split, personal_metrics
from fedlight.core.plan import RoundPlan, plan_round
from fedlight.core.server import DEFAULT_MAX_NORM_OVER_MEDIAN, ServerPipeline
from fedlight.core.state import State, add, subtract
from fedlight.core.storage import (
    append_text,
    atomic_write_text,
    check_writable,
    ensure_dir,
    release_loggers,
    remove_stale_tmp,
)
from fedlight.core.update import ClientUpdate
from fedlight.errors import ConfigError
from fedlight.peft.lora_variants import lora_layout
from fedlight.privacy.base import Privacy, RunSpec
from fedlight.privacy.none import NoPrivacy
from fedlight.privacy.secure_round import SecureAggregation, SecureRound, check_composition

MB = 1e6
ROUNDS_CSV = "rounds.csv"
#: leading columns of rounds.csv; task metrics (val_*) and others follow in first-seen order
CSV_COLUMNS = ("round", "num_clients", "rejected", "dropped", "failed", "uplink_bytes", "downlink_bytes", "cumulative_mb", "train_loss")


def _generator(seed: int, round_idx: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + round_idx) * 31 + stream)


class FederatedRound(pl.Callback):
    """One Lightning epoch == one federated round (the ``federation:`` config section).

    Args:
        rounds: number of rounds (sets ``trainer.max_epochs``).
        clients_per_round: clients sampled (uniformly, without replacement) each round.
        local_steps: local optimisation steps per sampled client; or
        local_epochs: local passes over each client's data (exclusive with ``local_steps``).
        aggregator: server-side aggregation (e.g. ``fedavg``).
        uplink_codec: how client updates are encoded (bytes counted are its payload lengths).
        downlink_codec: how the global trainable state is broadcast.
        privacy: privacy mechanism (``none`` by default).
        seed: sampling seed; defaults to ``seed_everything``'s seed.
        eval_before_training: evaluate the initial global model as round 0.
        checkpoint_every: write a resumable round checkpoint every N rounds and after the last one
            (``<log dir>/checkpoints/round-NNNN.ckpt`` and ``last.ckpt``); 0 disables.
        faults: simulated dropouts and stragglers, and the minimum number of updates per round.
        max_update_norm: reject (and count) updates whose L2 norm exceeds this bound.
        max_norm_over_median: with >= 3 valid updates in a round, reject those whose L2 norm exceeds this
            multiple of the round's median update norm (default 100; null disables; not applied under
            ``dp_fedavg`` or secure aggregation, see docs/robustness.md).
        attack: what malicious clients do (for evaluating defences; e.g. ``sign_flip``, ``alie``).
        malicious_fraction: fraction of all clients that are malicious (a fixed, seeded set).
        export_every: export the global adapter as a standard peft/timm/safetensors artefact every N
            rounds and after the last one (``<log dir>/adapters/round-NNNN/``); 0 disables.
        export_merged: also write a merged model with each export (HF-peft methods).
        client_method: client-side objective/correction (``fedprox``, ``scaffold``); null = plain local training.
        client_sampling: ``uniform`` or ``weighted`` (probability proportional to client data size).
        compute_tiers: per-client compute budgets (fractions of the local steps), assigned once, seeded.
        personal_eval_every: every N rounds (and after the last) evaluate each participating client's
            personalised model (global shared + its local tensors) on its label-matched share of the
            validation split; logs ``val_acc_personal_mean/std/min``; 0 disables.
        secure_aggregation: pairwise-masked secure aggregation (SecAgg): the server only ever holds
            masked updates and their sum; refuses robust aggregators, ``max_update_norm`` and lossy
            uplink codecs (see docs/privacy.md for the composition matrix).
    """

    def __init__(
        self,
        rounds: int = 10,
        clients_per_round: int = 10,
        local_steps: int | None = 10,
        local_epochs: float | None = None,
        aggregator: Aggregator = lazy_instance(FedAvg),
        uplink_codec: Codec = lazy_instance(IdentityCodec),
        downlink_codec: Codec = lazy_instance(IdentityCodec),
        privacy: Privacy = lazy_instance(NoPrivacy),
        seed: int | None = None,
        eval_before_training: bool = True,
        checkpoint_every: int = 1,
        faults: ClientFaults | None = None,
        max_update_norm: float | None = None,
        max_norm_over_median: float | None = DEFAULT_MAX_NORM_OVER_MEDIAN,
        attack: Attack | None = None,
        malicious_fraction: float = 0.0,
        export_every: int = 0,
        export_merged: bool = False,
        client_method: ClientMethod | None = None,
        client_sampling: str = "uniform",
        compute_tiers: ComputeTiers | None = None,
        personal_eval_every: int = 0,
        secure_aggregation: SecureAggregation | None = None,
    ) -> None:
        if rounds < 1:
            raise ValueError(f"federation.rounds must be >= 1, got {rounds}")
        if clients_per_round < 1:
            raise ValueError(f"federation.clients_per_round must be >= 1, got {clients_per_round}")
        if (local_steps is None) == (local_epochs is None):
            raise ValueError("set exactly one of federation.local_steps and federation.local_epochs (the other: null)")
        if local_steps is not None and local_steps < 1:
            raise ValueError(f"federation.local_steps must be >= 1, got {local_steps}")
        if local_epochs is not None and local_epochs <= 0:
            raise ValueError(f"federation.local_epochs must be > 0, got {local_epochs}")
        if checkpoint_every < 0:
            raise ValueError(f"federation.checkpoint_every must be >= 0, got {checkpoint_every}")
        if clients_per_round < (faults or ClientFaults()).min_clients:
            raise ValueError(
                f"federation.faults.min_clients ({(faults or ClientFaults()).min_clients}) exceeds "
                f"federation.clients_per_round ({clients_per_round}): no round could ever succeed"
            )
        if not 0.0 <= malicious_fraction < 1.0:
            raise ValueError(f"federation.malicious_fraction must be in [0, 1), got {malicious_fraction}")
        if (attack is None) != (malicious_fraction == 0.0):
            raise ValueError("federation.attack and federation.malicious_fraction > 0 go together: set both or neither")
        if privacy.requires_uniform_mean and not (isinstance(aggregator, FedAvg) and aggregator.weighting == "uniform"):
            raise ValueError(
                f"federation.privacy {privacy.name!r} calibrates its noise to an unweighted mean of clipped updates: "
                "use federation.aggregator: {class_path: fedavg, init_args: {weighting: uniform}}"
            )
        if export_every < 0:
            raise ValueError(f"federation.export_every must be >= 0, got {export_every}")
        self.export_every, self.export_merged = export_every, export_merged  # merged bases: see core/export.py
        if client_method is not None and client_method.sends_extra and not isinstance(privacy, NoPrivacy):
            raise ValueError(
                f"federation.client_method {client_method.name!r} sends extra tensors that federation.privacy "
                f"{privacy.name!r} does not protect; use privacy: none or another client_method"
            )
        if (
            client_method is not None
            and not client_method.respects_client_views
            and type(aggregator).client_view is not Aggregator.client_view
        ):
            raise ValueError(
                f"federation.client_method {client_method.name!r} cannot be combined with federation.aggregator "
                f"{aggregator.name!r}, whose clients train a restricted view of the global state (per-client ranks); "
                "use fedprox or another aggregator"
            )
        if personal_eval_every < 0:
            raise ValueError(f"federation.personal_eval_every must be >= 0, got {personal_eval_every}")
        self.client_method = client_method
        self.client_sampling = check_sampling(client_sampling)
        self.compute_tiers = compute_tiers
        self.personal_eval_every = personal_eval_every
        self._step_scale: list[float] | None = None
        self._personal_shares: list[np.ndarray] | None = None
        self.attack = attack
        self.malicious_fraction = malicious_fraction
        self.malicious: frozenset[int] = frozenset()
        self.rounds = rounds
        self.checkpoint_every = checkpoint_every
        self.faults = faults or ClientFaults()
        self.clients_per_round = clients_per_round
        self.local_steps = local_steps
        self.local_epochs = local_epochs
        self.aggregator = aggregator
        self.privacy = privacy
        self.client = ClientPipeline(uplink_codec, downlink_codec, privacy)
        self.server = ServerPipeline(
            uplink_codec, downlink_codec, aggregator, privacy, max_update_norm, max_norm_over_median
        )
        check_composition(
            secure_aggregation, aggregator, privacy, uplink_codec, max_update_norm, clients_per_round, client_method
        )
        self.secure_aggregation = secure_aggregation
        self._secure: SecureRound | None = None  # this round's protocol state (never checkpointed)
        self.seed = seed
        self.eval_before_training = eval_before_training
        # run state (checkpointed)
        self.global_state: State | None = None
        self.initial_local: State = {}
        self.base_total: State = {}  # Σ of merged base deltas (merging aggregators), see _merge_into_base
        self.client_store: dict[int, ClientState] = {}
        self.history: list[dict[str, Any]] = []
        # per-round scratch
        self.plan: RoundPlan | None = None
        self._reset_round()

    def _reset_round(self) -> None:
        self.updates: list[ClientUpdate] = []
        self.failed: dict[int, str] = {}
        self._malicious_work: list[tuple[int, State, State]] = []  # (client, start, trained)
        self.current_client: int | None = None
        self.clients_done = 0
        self.round_downlink = 0
        self._client_losses: list[float] = []
        self._round_losses: list[float] = []
        self._round_start = time.perf_counter()
        self._payload: bytes = b""
        self._client_start: State = {}
        self._method_payload: bytes = b""  # the client method's extra broadcast (e.g. SCAFFOLD's c)
        self._method_uplink: dict[int, bytes] = {}  # its extra uplink per client (e.g. Δc_i)

    # --- plumbing -------------------------------------------------------------------------------

    @property
    def total_uplink(self) -> int:
        return sum(r["uplink_bytes"] for r in self.history)

    @property
    def total_downlink(self) -> int:
        return sum(r["downlink_bytes"] for r in self.history)

    def skips_round(self, accepted: int) -> bool:
        """Too few accepted updates (``faults.min_clients``): the round leaves the global state unchanged.

        Never under a Poisson-cohort privacy mechanism: it releases every round (an empty cohort is
        noise only), and skipping would make the release depend on the data. Every engine calls this.
        """
        return accepted < self.faults.min_clients and self.privacy.cohort_sampling != "poisson"

    def plan_for(self, round_idx: int) -> RoundPlan:
        return plan_round(
            resolve_seed(self.seed),
            round_idx,
            self._dm.client_sizes,
            self.clients_per_round,
            self._dm.batch_size,
            self.local_steps,
            self.local_epochs,
            self.faults.dropout_before,
            self.faults.dropout_after,
            self.faults.deadline_steps,
            self.faults.straggler_policy,
            self.client_sampling,
            self._step_scale,
            # Poisson cohorts / independent batches only when the privacy accounting assumes them
            self.clients_per_round / self._dm.num_clients if self.privacy.cohort_sampling == "poisson" else None,
            self.privacy.batch_sampling,
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if stage != "fit":
            return
        if trainer.is_global_zero:  # a read-only, full or blocked log directory fails now, before round 1
            check_writable(self.log_dir(trainer))
        dm = trainer.datamodule
        if not isinstance(dm, FederatedDataModule) or not isinstance(pl_module, FederatedModule):
            raise ConfigError("the federation callback needs a FederatedModule and a FederatedDataModule")
        if trainer.reload_dataloaders_every_n_epochs != 1:
            raise ConfigError("trainer.reload_dataloaders_every_n_epochs must be 1: each round has its own batches")
        if trainer.limit_train_batches not in (1.0, None):
            raise ConfigError("trainer.limit_train_batches would cut rounds short; set federation.local_steps instead")
        if trainer.accumulate_grad_batches != 1:
            raise ConfigError("trainer.accumulate_grad_batches must be 1 (a batch must not span two clients)")
        if self.clients_per_round > dm.num_clients:
            raise ConfigError(
                f"federation.clients_per_round ({self.clients_per_round}) exceeds data.num_clients ({dm.num_clients})"
            )
        if trainer.max_epochs != self.rounds:
            raise ConfigError(f"trainer.max_epochs ({trainer.max_epochs}) must equal federation.rounds ({self.rounds})")
        self._dm = dm
        if self.compute_tiers is not None:
            self._step_scale = self.compute_tiers.assign(dm.num_clients, resolve_seed(self.seed))
        if self.personal_eval_every and accuracy_key(list(pl_module.task.metrics(dm.num_classes))) is None:
            raise ConfigError(
                f"federation.personal_eval_every: task {pl_module.task.name!r} has no accuracy metric to personalise"
            )
        dm.set_planner(self.plan_for)
        try:
            self.privacy.bind_run(self._run_spec(dm))
        except ValueError as err:
            raise ConfigError(f"federation.privacy: {err}") from err
        order = np.random.default_rng([resolve_seed(self.seed), 0xA77AC]).permutation(dm.num_clients)
        self.malicious = frozenset(int(c) for c in order[: round(self.malicious_fraction * dm.num_clients)])

    def _run_spec(self, dm: FederatedDataModule) -> RunSpec:
        """The run's shape for the privacy mechanism: sampling, rounds, and each client's most local steps."""
        steps = []
        for n in dm.client_sizes:
            k = self.local_steps if self.local_steps is not None else max(1, math.ceil(self.local_epochs * n / dm.batch_size))
            steps.append(min(k, self.faults.deadline_steps) if self.faults.deadline_steps else k)
        return RunSpec(
            dm.num_clients, self.clients_per_round, self.rounds, dm.batch_size, tuple(dm.client_sizes), tuple(steps),
            self.client_sampling, self.faults.min_clients,
        )  # fmt: skip

    def log_dir(self, trainer: pl.Trainer) -> Path:
        return ensure_dir(Path(trainer.log_dir or trainer.default_root_dir))

    def _remove_stale_tmp(self, trainer: pl.Trainer) -> None:
        """Temporaries of writes a killed run left (``*.ckpt.tmp``, ``rounds.csv.tmp``, half exports)."""
        if not trainer.is_global_zero:
            return
        log_dir = self.log_dir(trainer)
        for directory in (log_dir, log_dir / "checkpoints", log_dir / "adapters"):
            remove_stale_tmp(directory)
        if trainer.ckpt_path:  # the directory the run resumes from
            remove_stale_tmp(Path(trainer.ckpt_path).parent, "*.ckpt.tmp")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        release_loggers(trainer, exception)  # so the StorageError is the one message the run ends with

    # --- run start --------------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: FederatedModule) -> None:
        self._remove_stale_tmp(trainer)
        if self.global_state is None:  # a fresh run; on resume load_state_dict already set it
            self.global_state = pl_module.peft.get_state(pl_module.model, pl_module.shared_names)
            self.initial_local = pl_module.peft.get_state(pl_module.model, pl_module.local_names)
        else:
            self._check_resumed_state(pl_module)
        try:
            self.privacy.check_model(pl_module.model)
        except ValueError as err:
            raise ConfigError(f"federation.privacy: {err}") from err
        pl_module.private_step = self.privacy.private_step if self.privacy.per_sample else None
        if self.aggregator.needs_lora:  # LoRA-aware aggregation: the pairs whose A and B both travel
            shared = set(pl_module.shared_names)
            try:
                pairs = [p for p in lora_layout(pl_module.model) if p.a in shared and p.b in shared]
                self.aggregator.bind_lora(pairs)
            except ValueError as err:
                raise ConfigError(f"federation.aggregator {self.aggregator.name!r}: {err}") from err
        pl_module.kept_frozen = set(self.base_total)  # merged base weights go into round checkpoints
        if self.client_method is not None:
            shared = set(pl_module.shared_names)
            self._method_params = {
                n: p for n, p in pl_module.model.named_parameters() if p.requires_grad and n in shared
            }
            self.client_method.bind(list(self._method_params), self._dm.num_clients)

    def _check_resumed_state(self, pl_module: FederatedModule) -> None:
        """A checkpoint from another config fails here, before any round runs or anything is written."""
        params = dict(pl_module.model.named_parameters())
        if list(self.global_state) != pl_module.shared_names:
            raise CheckpointError(
                "checkpoint does not match this config: it ships tensors "
                f"{sorted(set(self.global_state) ^ set(pl_module.shared_names))[:5]} that this model does not "
                "(different peft method, targets or model?); resume with the config that wrote it"
            )
        for name, value in self.global_state.items():
            if value.shape != params[name].shape:
                raise CheckpointError(
                    f"checkpoint does not match this config: {name} has shape {tuple(value.shape)}, "
                    f"the model has {tuple(params[name].shape)}"
                )
    def on_train_start(self, trainer: pl.Trainer, pl_module: FederatedModule) -> None:
        if self.privacy.would_exceed(1):
            raise ConfigError(
                f"federation.privacy: one more round would exceed the privacy budget (epsilon now "
                f"{self.privacy.epsilon()}); raise target_epsilon or the noise multiplier"
            )
        if trainer.current_epoch == 0 and not self.history and trainer.is_global_zero:
            manifest = build_manifest(pl_module, self.client.uplink, self.client.downlink)
            write_manifest(manifest, self.log_dir(trainer) / "manifest.json")
            rank_zero_info(format_manifest(manifest))
        if trainer.current_epoch == 0 and not self.history and self.eval_before_training:
            loader = self._dm.val_dataloader()
            self._append_row(trainer, {"round": 0, "num_clients": 0, **pl_module.evaluate(loader)})
            self._write_samples(trainer, pl_module, 0)

    # --- round -------------------------------------------------------------------------------------

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: FederatedModule) -> None:
        self._reset_round()
        self.plan = self.plan_for(trainer.current_epoch + 1)
        self._payload = self.server.broadcast(self.global_state)
        if self.secure_aggregation is not None:  # key advertisement and share exchange among those who train
            session = f"{resolve_seed(self.seed)}/{self.plan.round}".encode()
            self._secure = SecureRound(
                self.secure_aggregation, self.global_state, list(self.plan.training), session,
                self.privacy.secure_clip_norm(), self.clients_per_round,
            )  # fmt: skip
            self.round_downlink += self._secure.downlink_overhead
        # merged base changes reach every client: a stateless server sends the cumulative change
        self._base_payload = self.server.broadcast(self.base_total) if self.base_total else b""
        if self.client_method is not None and (extra := self.client_method.broadcast(self.global_state)):
            self._method_payload = self.server.broadcast(extra)  # nothing is sent when there is nothing extra

    def on_train_batch_start(self, trainer, pl_module: FederatedModule, batch: Any, batch_idx: int) -> None:
        client_id = int(batch["client_id"][0])
        if client_id != self.current_client:
            if self.current_client is not None:
                self._finish_client(trainer, pl_module)
            self._start_client(trainer, pl_module, client_id)
        if client_id in self.malicious:
            batch.update(self.attack.poison_batch(batch, pl_module.num_classes))

    def on_train_batch_end(self, trainer, pl_module: FederatedModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        error = pl_module.pop_client_error()
        if error is not None and self.current_client not in self.failed:
            self.failed[self.current_client] = error
            rank_zero_warn(f"[fedlight] round {self.plan.round}: client {self.current_client} raised; excluded:\n{error}")
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._client_losses.append(float(loss))
        if batch_idx == trainer.num_training_batches - 1:
            self._finish_client(trainer, pl_module)
            self._end_round(trainer, pl_module)

    def _start_client(self, trainer: pl.Trainer, pl_module: FederatedModule, client_id: int) -> None:
        self.current_client = client_id
        self._client_start = self.aggregator.client_view(self.client.receive(self._payload), client_id)
        self.round_downlink += len(self._payload) + len(self._base_payload)
        peft, model = pl_module.peft, pl_module.model
        peft.set_state(model, self._client_start)
        peft.set_state(model, self.client_store.get(client_id, {}).get("local", self.initial_local))
        for optimizer in trainer.optimizers:  # every client starts with fresh optimizer state
            optimizer.state.clear()
        pl_module.skip_client = None
        self.privacy.on_client_start(client_id, _generator(resolve_seed(self.seed), self.plan.round, 5000 + client_id))
        if self.client_method is not None:
            received = self.client.receive(self._method_payload) if self._method_payload else {}
            self.round_downlink += len(self._method_payload)
            client_state = self.client_store.get(client_id, {})  # written at client end, if it sends
            self.client_method.start_client(client_id, self._client_start, received, client_state)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: FederatedModule, optimizer) -> None:
        """The client method's gradient correction (FedProx's proximal gradient, SCAFFOLD's c − c_i)."""
        if self.client_method is not None and self.current_client is not None:
            self.client_method.correct_gradients(self._method_params, optimizer.param_groups[0]["lr"])

    def _finish_client(self, trainer: pl.Trainer, pl_module: FederatedModule) -> None:
        client_id = self.current_client
        peft, model = pl_module.peft, pl_module.model
        self.clients_done += 1
        self.current_client = None
        self._round_losses.extend(self._client_losses)
        self._client_losses = []
        if client_id in self.failed or client_id in self.plan.lost:
            return  # a crashed client, or one whose update never arrives: nothing reaches the server
        trained = peft.get_state(model, pl_module.shared_names)
        if client_id in self.malicious:  # colluding attackers craft their updates together at round end
            self._malicious_work.append((client_id, self._client_start, trained))
            return
        mean_loss = sum(self._client_losses) / max(len(self._client_losses), 1)
        self._send(client_id, self._client_start, trained, {"train_loss": mean_loss})
        if self.client_method is not None:
            extra = self.client_method.finish_client(
                client_id, self._client_start, trained, self.client_store.setdefault(client_id, {})
            )
            if extra:
                self._method_uplink[client_id] = self.client.uplink.encode(extra)
        if pl_module.local_names:
            self.client_store[client_id]["local"] = peft.get_state(model, pl_module.local_names)

    def _send(self, client_id: int, start: State, trained: State, metrics: dict[str, float]) -> None:
        if self._secure is not None:  # client side of secure aggregation: only a masked vector leaves
            generator = _generator(resolve_seed(self.seed), self.plan.round, 1000 + client_id)
            delta = self.privacy.client_transform(subtract(trained, start), generator)
            update = self._secure.client_update(client_id, delta, self._dm.client_sizes[client_id], metrics)
            self.client_store.setdefault(client_id, {})  # local tensors are stored there after sending
            if update is not None:
                self.updates.append(update)
            elif self._secure.failure is None:
                self.failed[client_id] = "update not sent: NaN/Inf values (checked on the client under secure aggregation)"
            return
        self.updates.append(
            self.client.finish(
                client_id,
                start,
                trained,
                num_examples=self._dm.client_sizes[client_id],
                generator=_generator(resolve_seed(self.seed), self.plan.round, 1000 + client_id),
                client_state=self.client_store.setdefault(client_id, {}),
                metrics=metrics,
            )
        )

    def _send_malicious(self) -> None:
        if not self._malicious_work:
            return
        honest = [subtract(trained, start) for _, start, trained in self._malicious_work]
        expected = len(self.updates) + len(honest)
        generator = _generator(resolve_seed(self.seed), self.plan.round, 2)
        poisoned = self.attack.poison_updates(honest, expected, generator)
        for (client_id, start, _), delta in zip(self._malicious_work, poisoned, strict=True):
            self._send(client_id, start, add(start, delta), {"malicious": 1.0})
        self._malicious_work = []

    def _end_round(self, trainer: pl.Trainer, pl_module: FederatedModule) -> None:
        self._send_malicious()
        generator = _generator(resolve_seed(self.seed), self.plan.round, 0)
        if self._secure is not None:  # the server path holds masked vectors and their sum only
            new_global, report = self._secure.aggregate(self.server, self.global_state, self.updates, generator)
            self.round_downlink += self._secure.late_downlink
        else:
            new_global, report = self.server.aggregate(self.global_state, self.updates, generator)
        report.uplink_bytes += sum(len(b) for b in self._method_uplink.values())  # client-method extras
        self.privacy.on_round_end()  # charged because clients were queried, whatever arrived
        for client_id, reason in report.rejected.items():
            rank_zero_info(f"[fedlight] round {self.plan.round}: rejected update of client {client_id}: {reason}")
        if report.skipped:  # a non-finite aggregate: the server kept the global state (docs/robustness.md)
            rank_zero_warn(f"[fedlight] round {self.plan.round}: {report.skipped}")
        self._round_report = report
        if self.skips_round(len(report.accepted)):
            message = (
                f"round {self.plan.round}: {len(report.accepted)} accepted updates < federation.faults.min_clients "
                f"({self.faults.min_clients})"
            )
            if self.faults.on_too_few_clients == "stop":
                raise TooFewClientsError(message + "; stopping (resume from the last round checkpoint)")
            rank_zero_warn(f"[fedlight] {message}; round skipped, global model unchanged")
            new_global = self.global_state
        elif self.client_method is not None:  # the method's server state moves with accepted updates only
            up = self._method_uplink
            self.client_method.server_update([(c, self.client.uplink.decode(up[c])) for c in report.accepted if c in up])
        if report.base_delta and new_global is not self.global_state:  # a merging aggregator (not a skipped round)
            self._merge_into_base(pl_module, report.base_delta)
        self.global_state = new_global
        pl_module.peft.set_state(pl_module.model, new_global)
        pl_module.peft.set_state(pl_module.model, self.initial_local)

    def _merge_into_base(self, pl_module: FederatedModule, base_delta: State) -> None:
        """The one place frozen base weights change (``Aggregator.merges_into_base``, e.g. FedEx-LoRA).

        Added in place (fp32), so a resumed run, which loads the merged weights from the round
        checkpoint (``FederatedModule.kept_frozen``), continues bit-identically. ``base_total`` is the
        cumulative change: what a client must receive (counted as downlink each time one starts).
        """
        params = dict(pl_module.model.named_parameters())
        with torch.no_grad():
            for name, delta in base_delta.items():
                param = params[name]
                if param.requires_grad or delta.shape != param.shape:
                    raise ValueError(f"aggregator base delta {name}: not a frozen weight of shape {tuple(param.shape)}")
                param.add_(delta.to(param.device, param.dtype))
                total = self.base_total.get(name)
                self.base_total[name] = delta.float().clone() if total is None else total + delta.float()
        pl_module.kept_frozen = set(self.base_total)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: FederatedModule) -> None:
        report = self._round_report
        metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_") and v.numel() == 1
        }
        row = {
            "round": self.plan.round,
            "num_clients": len(report.accepted),
            "rejected": len(report.rejected),
            "dropped": len(self.plan.dropped_before) + len(set(self.plan.lost) - set(self.failed)) - self.plan.placeholder,
            "failed": len(self.failed),
            "uplink_bytes": report.uplink_bytes,
            "downlink_bytes": self.round_downlink,
            "train_loss": sum(self._round_losses) / max(len(self._round_losses), 1),
            **metrics,
            **self._personal_eval(pl_module),
            "epsilon": self.privacy.epsilon(),
            **self.privacy.metrics(),
            "round_time_s": round(time.perf_counter() - self._round_start, 3),
        }
        self._append_row(trainer, row)
        self._write_samples(trainer, pl_module, self.plan.round)
        self.updates, self.round_downlink = [], 0  # now counted in history
        last = self.plan.round == self.rounds
        if self.checkpoint_every and (self.plan.round % self.checkpoint_every == 0 or last):
            directory = self.log_dir(trainer) / "checkpoints"
            path = directory / f"round-{self.plan.round:04d}.ckpt"
            trainer.save_checkpoint(path, weights_only=False)  # full state: the round callback resumes from it
            atomic_copy(path, directory / "last.ckpt")
        if self.export_every and (self.plan.round % self.export_every == 0 or last) and trainer.is_global_zero:
            out = self.log_dir(trainer) / "adapters" / f"round-{self.plan.round:04d}"
            export_adapter(pl_module, out, merged=self.export_merged, base_delta=self.base_total)
        if not last and self.privacy.would_exceed(1):
            rank_zero_warn(
                f"[fedlight] stopping after round {self.plan.round}: another round would exceed the privacy budget "
                f"(epsilon {self.privacy.epsilon():.3f})"
            )
            trainer.should_stop = True

    def _personal_eval(self, pl_module: FederatedModule) -> dict[str, float]:
        """Personalised metrics over the clients that have trained so far (see core/personal.py)."""
        every, r = self.personal_eval_every, self.plan.round
        if not every or (r % every and r != self.rounds):
            return {}
        dm = self._dm
        if self._personal_shares is None:
            val_labels = np.asarray([ex.get("label", 0) for ex in dm.splits.val], dtype=np.int64)
            self._personal_shares = label_matched_split(
                dm.client_indices, dm.splits.train_labels(), val_labels, resolve_seed(dm.seed)
            )
        key = accuracy_key(list(pl_module.task.metrics(pl_module.num_classes)))
        locals_ = {c: s["local"] for c, s in self.client_store.items() if "local" in s}
        return personal_metrics(
            pl_module, dm.splits.val, self._personal_shares, sorted(self.client_store), locals_,
            self.initial_local, key, dm.eval_batch_size,
        )  # fmt: skip

    def _append_row(self, trainer: pl.Trainer, row: dict[str, Any]) -> None:
        row.setdefault("uplink_bytes", 0)
        row.setdefault("downlink_bytes", 0)
        self.history.append(row)
        cumulative = 0
        for r in self.history:
            cumulative += r["uplink_bytes"] + r["downlink_bytes"]
            r["cumulative_mb"] = round(cumulative / MB, 6)
        if trainer.is_global_zero:
            self._write_csv(self.log_dir(trainer) / ROUNDS_CSV)

    def _write_samples(self, trainer: pl.Trainer, pl_module: FederatedModule, round_idx: int) -> None:
        """A few generations of the global model per round, for a person to read (generative tasks)."""
        samples = getattr(pl_module, "last_samples", None)
        if not samples or not trainer.is_global_zero:
            return
        lines = []
        for sample in samples:  # the task's (prompt, generation, reference) triples, evaluators' dicts
            if isinstance(sample, dict):
                record = {"round": round_idx, **sample}
            else:
                prompt, generation, reference = sample
                record = {"round": round_idx, "prompt": prompt, "generation": generation, "reference": reference}
            lines.append(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        append_text(self.log_dir(trainer) / "samples.jsonl", "".join(lines))  # all of a round's lines or none

    def _write_csv(self, path: Path) -> None:
        columns: list[str] = list(CSV_COLUMNS)
        for r in self.history:
            columns.extend(k for k in r if k not in columns)
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write_text(path, text.getvalue())  # a reader never sees a half-written file

    def on_fit_end(self, trainer: pl.Trainer, pl_module: FederatedModule) -> None:
        rank_zero_info(self.summary())

    def summary(self) -> str:
        rows = [r for r in self.history if r["round"] > 0]
        if not rows:
            return "[fedlight] no rounds completed"
        metric = next((k for k in ("val_acc", "val_f1", "val_loss") if k in rows[-1]), None)
        text = f"[fedlight] {len(rows)} rounds"
        if metric:
            first = self.history[0].get(metric)
            best = max(rows, key=lambda r: r.get(metric, float("-inf")) * (-1 if metric == "val_loss" else 1))
            text += f" | {metric}: round 0 {first:.4f} -> final {rows[-1][metric]:.4f}" if first is not None else ""
            text += f" (best {best[metric]:.4f} @ round {best['round']})"
        text += (
            f" | uplink {self.total_uplink / MB:.3f} MB, downlink {self.total_downlink / MB:.3f} MB,"
            f" total {(self.total_uplink + self.total_downlink) / MB:.3f} MB"
        )
        return text

    # --- checkpointing ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "global_state": self.global_state,
            "initial_local": self.initial_local,
            "client_store": self.client_store,
            "history": self.history,
            "aggregator": self.aggregator.state_dict(),
            "privacy": self.privacy.state_dict(),
            "codecs": {"uplink": self.client.uplink.state_dict(), "downlink": self.client.downlink.state_dict()},
            "client_method": self.client_method.state_dict() if self.client_method is not None else {},
            "base_total": self.base_total,
            "rng": capture_rng(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_state = state["global_state"]
        self.initial_local = state["initial_local"]
        self.client_store = state["client_store"]
        self.history = state["history"]
        self.base_total = state.get("base_total", {})
        self.aggregator.load_state_dict(state["aggregator"])
        self.privacy.load_state_dict(state["privacy"])
        self.client.uplink.load_state_dict(state["codecs"]["uplink"])
        self.client.downlink.load_state_dict(state["codecs"]["downlink"])
        if self.client_method is not None:
            self.client_method.load_state_dict(state.get("client_method", {}))
        restore_rng(state["rng"])
