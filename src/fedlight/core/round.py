"""FederatedRound: the Lightning glue that turns one Lightning epoch into one federated round.

It keeps the ``federation:`` section's typed arguments (the YAML schema), builds a
:class:`~fedlight.core.engine.RoundEngine` from them (``core/federation.py``) and maps Lightning's
hooks onto engine calls. Everything a round does lives in the engine, its pipelines and its features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from jsonargparse import lazy_instance
from lightning.pytorch.utilities import rank_zero_warn

from fedlight.aggregators.base import Aggregator
from fedlight.aggregators.fedavg import FedAvg
from fedlight.attacks.base import Attack
from fedlight.client_methods.base import ClientMethod
from fedlight.codecs.base import Codec
from fedlight.codecs.identity import IdentityCodec
from fedlight.core.checkpoint import AtomicCheckpointIO, capture_rng, restore_rng
from fedlight.core.datamodule import FederatedDataModule
from fedlight.core.engine import Population
from fedlight.core.executors import make_executor
from fedlight.core.faults import ClientFaults
from fedlight.core.federation import FederationOptions
from fedlight.core.heterogeneity import ComputeTiers
from fedlight.core.module import FederatedModule
from fedlight.core.round_callbacks import AdapterExport, RoundCheckpoint, RunRecords, check_trainer
from fedlight.core.runlog import RunLog
from fedlight.core.server import DEFAULT_MAX_NORM_OVER_MEDIAN
from fedlight.core.storage import check_writable, ensure_dir, release_loggers
from fedlight.errors import ConfigError, as_config_error
from fedlight.features.base import RoundFeature
from fedlight.privacy.base import Privacy
from fedlight.privacy.none import NoPrivacy
from fedlight.privacy.secure_round import SecureAggregation


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
        features: more round features (``round_features`` plugins), run after the built-in ones.
        execution: how sampled clients run in-process: ``steps`` (each local step a Lightning step),
            ``sequential`` (the engine runs each client's steps inside one Lightning step: less
            overhead) or ``grouped`` (``group_size`` clients train side by side in one vectorised step
            over the frozen backbone; falls back to sequential, with a notice, where it cannot).
        group_size: clients per group under ``grouped`` (``auto``: up to 16).
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
        features: list[RoundFeature] | None = None,
        execution: Literal["steps", "sequential", "grouped"] = "steps",
        group_size: int | Literal["auto"] = "auto",
    ) -> None:
        options = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.options = FederationOptions(**options)
        self.engine = self.options.build_engine()
        self.rounds = rounds
        self.executor = make_executor(self.engine, execution, group_size)  # a callback added at setup

    # what scripts and tests read of a run (the engine owns it)
    _ENGINE_VIEWS = frozenset(
        {"global_state", "history", "client_store", "initial_local", "client", "server", "privacy", "total_uplink",
         "total_downlink", "plan_for", "skips_round"}
    )  # fmt: skip

    def __getattr__(self, name: str) -> Any:
        if name in FederatedRound._ENGINE_VIEWS:
            return getattr(self.engine, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    aggregator = property(lambda self: self.engine.server.aggregator)
    client_method = property(lambda self: self.options.client_method)
    malicious = property(lambda self: getattr(self.engine.feature("malicious_clients"), "malicious", frozenset()))
    base_total = property(lambda self: self.engine.frozen_changes())  # what an export must fold in

    def summary(self) -> str:
        return RunLog.summary(self.engine)

    # --- run set-up -----------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if stage != "fit":
            return
        log_dir = self.log_dir(trainer)  # on every rank: trainer.log_dir is a collective under DDP
        if trainer.is_global_zero:  # a read-only, full or blocked log directory fails now, before round 1
            check_writable(log_dir)
        dm = trainer.datamodule
        if not isinstance(dm, FederatedDataModule) or not isinstance(pl_module, FederatedModule):
            raise ConfigError("the federation callback needs a FederatedModule and a FederatedDataModule")
        check_trainer(trainer, self.options, dm)
        o = self.options
        with as_config_error():
            self.engine.bind(Population(tuple(dm.client_sizes), dm.batch_size), dm)
        dm.set_planner(self.engine.plan_for, self.executor.units)
        extra = [
            RunRecords(self),
            RoundCheckpoint(self, o.checkpoint_every),
            AdapterExport(self, o.export_every, o.export_merged),
        ]
        for callback in [self.executor, *extra]:  # they run after this one, in this order
            if not any(type(c) is type(callback) for c in trainer.callbacks):
                trainer.callbacks.append(callback)

    def log_dir(self, trainer: pl.Trainer) -> Path:
        return ensure_dir(Path(trainer.log_dir or trainer.default_root_dir))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        release_loggers(trainer, exception)  # so a StorageError is the one message the run ends with

    def on_fit_start(self, trainer: pl.Trainer, pl_module: FederatedModule) -> None:
        with as_config_error():
            self.engine.attach(pl_module)

    # --- the round ------------------------------------------------------------------------------

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: FederatedModule) -> None:
        self.engine.begin_round(trainer.current_epoch + 1)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: FederatedModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_") and v.numel() == 1}
        self.engine.round_row(metrics)  # the run's records write it (RunRecords, after this callback)
        reason = self.engine.stop_reason()
        if reason:
            rank_zero_warn(f"[fedlight] stopping after round {self.engine.round.round}: {reason}")
            trainer.should_stop = True

    # --- checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {**self.engine.state_dict(), "rng": capture_rng()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state)
        restore_rng(state["rng"])
