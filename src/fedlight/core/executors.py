"""How a round's sampled clients are run in-process (``federation.execution``).

* ``steps`` — every local step is one Lightning training step (Lightning's loop, precision plugin,
  gradient clipping and callbacks run per step; the reference behaviour).
* ``sequential`` — a round is one Lightning step: the engine runs each client's local steps itself
  (:func:`fedlight.core.local.train_client`, what Lightning's automatic optimisation does per step),
  one client after another, without Lightning's per-step (or per-client) hooks. Same batches, same
  order, same result.
* ``grouped`` — a round is one Lightning step of groups of ``group_size`` clients, each group trained
  side by side in one vectorised step over the frozen backbone (:mod:`fedlight.core.grouped`); runs
  that cannot be stacked (:func:`fedlight.core.compat.grouping_blocker`) run ``sequential`` with a
  one-line notice.

Every execution trains each client on the batches the ``steps`` loader would give it, and the
updates reach the server in plan order, so the round's result is the same up to float rounding.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from fedlight.core import compat
from fedlight.core.datamodule import RoundUnits
from fedlight.core.distributed import gather_round
from fedlight.core.engine import RoundEngine
from fedlight.core.grouped import GroupedTrainer
from fedlight.core.local import train_client
from fedlight.core.plan import RoundPlan
from fedlight.errors import as_config_error

EXECUTIONS = ("steps", "sequential", "grouped")
# a round of work units is one Lightning batch from a one-item iterable dataset (RoundUnits): neither
# Lightning warning about it applies (no worker shards it; fedlight logs per round, not per step)
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
warnings.filterwarnings("ignore", message=r"The number of training batches \(1\) is smaller than the logging interval")
#: ``group_size: auto`` stacks up to this many clients (the memory of G batches' activations at once)
AUTO_GROUP = 16


def check_execution(execution: str, group_size: int | str) -> None:
    """Raise ValueError naming the option for an unknown execution or a bad group size."""
    if execution not in EXECUTIONS:
        raise ValueError(f"federation.execution must be one of {list(EXECUTIONS)}, got {execution!r}")
    if group_size != "auto" and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"federation.group_size must be 'auto' or an integer >= 1, got {group_size!r}")


def check_trainer(execution: str, trainer: Any) -> None:
    """Trainer settings the engine's own local loop cannot reproduce fail before round 1."""
    if execution == "steps":
        return
    if str(trainer.precision) in ("16-mixed", "16"):
        raise ValueError(
            f"federation.execution {execution!r} runs local steps without Lightning's loss scaling, which "
            "trainer.precision 16-mixed needs; use execution: steps, or precision bf16-mixed / 32-true"
        )
    for config in trainer.lr_scheduler_configs:
        if config.interval == "step":
            raise ValueError(
                f"federation.execution {execution!r}: a learning-rate scheduler with interval 'step' would step "
                "once per client, not per local step; use interval 'epoch' (once per round) or execution: steps"
            )


class Executor(pl.Callback):
    """What every execution shares: a Lightning callback the federation callback adds after itself,
    which ends the round after the epoch's last Lightning batch (the server's pipeline, then validation)."""

    units: Any = None  # how a round's plan is cut into work units (None: one Lightning batch per local step)

    def __init__(self, engine: RoundEngine) -> None:
        self.engine = engine

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx != trainer.num_training_batches - 1:
            return
        if self.engine.current is not None:  # steps: the last client is still current
            self.engine.finish_client()
        r = self.engine.end_round()
        for client_id, reason in (r.report.rejected if r.report else {}).items():
            rank_zero_info(f"[fedlight] round {r.round}: rejected update of client {client_id}: {reason}")
        if r.skipped:
            rank_zero_warn(f"[fedlight] round {r.round}: {r.skipped}; round skipped, global model unchanged")


class StepExecutor(Executor):
    """``steps``: each Lightning batch is one local step of the client it is tagged with; a client starts
    at its first batch (fresh optimizer state) and finishes when the next client's batch arrives."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        engine, client_id = self.engine, int(batch["client_id"][0])
        if engine.current is None or engine.current.client_id != client_id:
            if engine.current is not None:
                engine.finish_client()
            engine.start_client(client_id)
            for optimizer in trainer.optimizers:  # every client starts with fresh optimizer state
                optimizer.state.clear()
            pl_module.skip_client = None
        engine.on_batch(batch)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        self.engine.on_gradients(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        engine = self.engine
        error = pl_module.pop_client_error()
        if error is not None and engine.client_failed(client := engine.client_run.client_id, error):
            rank_zero_warn(f"[fedlight] round {engine.round.round}: client {client} raised; excluded:\n{error}")
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            engine.record_loss(float(loss))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class ClientExecutor(Executor):
    """Cuts each round into work units and trains them (sequentially or grouped) for one run.

    For ``execution`` other than ``steps``: at fit start it checks the trainer, takes over the module's
    optimisation and hands the module its ``run_units``; at each epoch's end it steps the epoch
    schedulers. On several devices the round ends with every rank's round part gathered
    (:func:`fedlight.core.distributed.gather_round`).
    """

    def __init__(self, engine: RoundEngine, execution: str, group_size: int | str) -> None:
        super().__init__(engine)
        self.execution, self.group_size = execution, group_size
        self.notice: str | None = None
        self.grouped: GroupedTrainer | None = None
        self.trainer: Any = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        engine = self.engine  # attached: the federation callback's on_fit_start ran first
        with as_config_error():
            check_trainer(self.execution, trainer)
        self.trainer = trainer
        # Lightning must not step an optimizer of its own (the executor's are per client), and under DDP a
        # step that returns None is only allowed in manual optimisation
        engine.module.automatic_optimization = False
        if self.execution == "grouped":
            reason = compat.grouping_blocker(engine.module, engine.privacy, engine.features, trainer.optimizers[0])
            if reason:
                self.execution = "sequential"
                self.notice = f"federation.execution grouped -> sequential: {reason}"
                rank_zero_info(f"[fedlight] {self.notice}")
            else:
                self.grouped = GroupedTrainer(engine)
        engine.module.run_units = self.run

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Step the epoch-interval schedulers once per round, as Lightning's automatic optimisation would."""
        for config in trainer.lr_scheduler_configs:
            if config.interval != "epoch" or trainer.current_epoch % config.frequency:
                continue
            if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                config.scheduler.step(float(trainer.callback_metrics[config.monitor]))
            else:
                config.scheduler.step()

    def units(self, plan: RoundPlan) -> list[list[int]]:
        """Positions in ``plan.training`` of this process's work units: one client, or consecutive groups (plan
        order); on several devices only this rank's clients (:func:`~fedlight.core.distributed.assign_ranks`).
        A rank without clients has none, and still reaches the round's end: the round is one Lightning batch."""
        world = self.trainer.world_size
        positions = list(range(len(plan.training)))
        if world > 1:
            from fedlight.core.distributed import assign_ranks

            positions = assign_ranks(plan, world)[self.trainer.global_rank]
        size = 1 if self.execution == "sequential" else (AUTO_GROUP if self.group_size == "auto" else self.group_size)
        assert isinstance(size, int)
        return [positions[i : i + size] for i in range(0, len(positions), size)]

    def _optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        """A fresh client optimizer at the learning rate the run's (scheduled) optimizer has now."""
        optimizer = self.engine.module.make_optimizer(params)
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        for group in optimizer.param_groups:
            group["lr"] = lr
        return optimizer

    def run(self, work: RoundUnits) -> None:
        """Train the round's work units on this rank (their updates go to the engine); a client that raises is
        excluded. On several devices every rank's round part then reaches every rank."""
        failed = set(self.engine.round.failed)
        for unit in work.work():  # each on the module's device, through the module's batch-transfer hooks
            self._train(self.trainer.strategy.batch_to_device(unit))
        for client, error in self.engine.round.failed.items():
            if client not in failed and error.startswith("Traceback"):  # not a pipeline's refusal
                message = f"[fedlight] round {self.engine.round.round}: client {client} raised; excluded:\n{error}"
                warnings.warn(message, UserWarning, stacklevel=2)
        if self.trainer.world_size > 1:
            gather_round(self.engine, self.trainer.world_size)

    def _train(self, unit: Sequence[tuple[int, Sequence[dict[str, Any]]]]) -> None:
        trainer = self.trainer
        clip_val = trainer.gradient_clip_val
        clip_algorithm = str(trainer.gradient_clip_algorithm or "norm")
        if self.grouped is not None:
            self.grouped.train(unit, self._optimizer, clip_val, clip_algorithm)
            return
        params = [p for p in self.engine.module.net.parameters() if p.requires_grad]
        for client_id, batches in unit:
            make = partial(self._optimizer, params)
            train_client(self.engine, client_id, batches, make, clip_val=clip_val, clip_algorithm=clip_algorithm)


def make_executor(engine: RoundEngine, execution: str, group_size: int | str) -> Executor:
    """The callback that runs ``federation.execution`` for one run."""
    return StepExecutor(engine) if execution == "steps" else ClientExecutor(engine, execution, group_size)
