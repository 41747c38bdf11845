"""The Lightning side of a round besides the glue: the run's records (manifest, round 0, ``rounds.csv`` and
Lightning's loggers), round checkpoints and adapter exports (ordinary callbacks the federation callback adds,
run after it at every round end, so the round's row is already in the history they save) and the trainer checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from fedlight.core.checkpoint import atomic_copy
from fedlight.core.export import export_adapter
from fedlight.core.manifest import build_manifest, format_manifest, write_manifest
from fedlight.core.runlog import RunLog
from fedlight.core.storage import remove_stale_tmp
from fedlight.errors import ConfigError


def remove_stale_run_files(log_dir: Path, ckpt_path: str | None) -> None:
    """Temporaries of writes a killed run left in the log directory, and beside the checkpoint it resumes from."""
    for directory in (log_dir, log_dir / "checkpoints", log_dir / "adapters"):
        remove_stale_tmp(directory)
    if ckpt_path:
        remove_stale_tmp(Path(ckpt_path).parent, "*.ckpt.tmp")


def _due(every: int, round_idx: int, rounds: int) -> bool:
    return bool(every) and (round_idx % every == 0 or round_idx == rounds)


class RunRecords(pl.Callback):
    """What a run writes for people and tools: ``manifest.json`` and round 0 before the first round,
    then after every round its ``rounds.csv`` row (and generations) and the row in every Lightning logger."""

    def __init__(self, federation: Any) -> None:
        self.federation = federation
        self.log: RunLog | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = self.federation.log_dir(trainer)
        if trainer.is_global_zero:  # temporaries of writes a killed run left (*.ckpt.tmp, rounds.csv.tmp, exports)
            remove_stale_run_files(log_dir, trainer.ckpt_path)
        self.log = RunLog(log_dir, enabled=trainer.is_global_zero)

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        engine = self.federation.engine
        if trainer.current_epoch or engine.history:  # resumed: written by the run that started it
            return
        log_dir = self.federation.log_dir(trainer)  # on every rank: trainer.log_dir is a collective under DDP
        if trainer.is_global_zero:
            manifest = build_manifest(pl_module, engine.client.uplink, engine.client.downlink)
            write_manifest(manifest, log_dir / "manifest.json")
            rank_zero_info(format_manifest(manifest))
        if self.federation.options.eval_before_training:
            engine.append_row({"round": 0, "num_clients": 0, **pl_module.evaluate(trainer.datamodule.val_dataloader())})
            self._record(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank_zero_info(self.federation.summary())

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        history = self.federation.engine.history
        assert self.log is not None, "on_fit_start opens the run log"
        self.log.write(history, pl_module, history[-1]["round"])
        log_row(trainer, history[-1])


class RoundCheckpoint(pl.Callback):
    """``<log dir>/checkpoints/round-NNNN.ckpt`` (and ``last.ckpt``) every N rounds and after the last one."""

    def __init__(self, federation: Any, every: int) -> None:
        self.federation, self.every = federation, every

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        r = self.federation.engine.round.round
        if not _due(self.every, r, self.federation.rounds):
            return
        directory = self.federation.log_dir(trainer) / "checkpoints"
        path = directory / f"round-{r:04d}.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # full state: the round callback resumes from it
        if trainer.is_global_zero:
            atomic_copy(path, directory / "last.ckpt")


class AdapterExport(pl.Callback):
    """``<log dir>/adapters/round-NNNN/``: the global adapter as a standard peft/timm/safetensors artefact."""

    def __init__(self, federation: Any, every: int, merged: bool) -> None:
        self.federation, self.every, self.merged = federation, every, merged

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        r = self.federation.engine.round.round
        if not _due(self.every, r, self.federation.rounds):
            return
        out = self.federation.log_dir(trainer) / "adapters" / f"round-{r:04d}"  # every rank: a collective
        if trainer.is_global_zero:
            export_adapter(pl_module, out, merged=self.merged, base_delta=self.federation.engine.frozen_changes())


def log_row(trainer: pl.Trainer, row: dict[str, Any]) -> None:
    """Every numeric rounds.csv column to every Lightning logger: ``round/<column>`` against the round, and
    ``round_by_kb/<column>`` against the cumulative kilobytes sent so far (accuracy vs communication)."""
    values = {
        k: float(v) for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool) and k != "round"
    }
    kb = int(round(row.get("cumulative_mb", 0.0) * 1000))
    for logger in trainer.loggers:
        logger.log_metrics({f"round/{k}": v for k, v in values.items()}, step=int(row["round"]))
        logger.log_metrics({f"round_by_kb/{k}": v for k, v in values.items() if k.startswith("val_")}, step=kb)
        logger.save()


def check_devices(trainer: pl.Trainer, options: Any) -> None:
    """Several devices/nodes: only what spreads a round's clients over ranks exactly (``core/distributed.py``)."""
    from fedlight.core.distributed import STRATEGY, FederatedDDPStrategy

    where = f"trainer.devices {trainer.num_devices} x trainer.num_nodes {trainer.num_nodes}"
    if not isinstance(trainer.strategy, FederatedDDPStrategy):
        raise ConfigError(
            f"{where} with trainer.strategy {type(trainer.strategy).__name__}: set trainer.strategy: {STRATEGY} "
            "(each rank trains its own clients; Lightning's ddp would average unrelated clients' gradients, and "
            "FSDP/DeepSpeed shard a model whose trainable part changes with every client). To scale out over "
            "machines, use the Flower engine (`fedlight flower`)"
        )
    if trainer.num_nodes > 1:
        raise ConfigError(
            f"{where}: several nodes are not supported by fedlight_ddp (untested across machines); use the devices "
            "of one node, or the Flower engine (`fedlight flower`) to scale out over machines"
        )
    if options.execution == "steps":
        raise ConfigError(f"{where}: set federation.execution: sequential or grouped (work units of whole clients)")
    if options.clients_per_round < trainer.world_size:
        raise ConfigError(
            f"{where}: federation.clients_per_round ({options.clients_per_round}) is less than the "
            f"{trainer.world_size} ranks; use fewer devices or sample more clients"
        )
    if options.privacy.per_sample:
        raise ConfigError(f"{where}: federation.privacy {options.privacy.name!r} counts private steps on the rank "
                          "that runs them; use trainer.devices: 1 (or dp_fedavg)")  # fmt: skip
    if options.secure_aggregation is not None:
        raise ConfigError(f"{where}: federation.secure_aggregation draws each party's secrets on its rank; use "
                          "trainer.devices: 1 or the Flower engine")  # fmt: skip


def check_trainer(trainer: pl.Trainer, options: Any, dm: Any) -> None:
    """Trainer settings that would break the one-epoch-one-round mapping fail before round 1."""
    if trainer.world_size > 1:
        check_devices(trainer, options)
    if trainer.reload_dataloaders_every_n_epochs != 1:
        raise ConfigError("trainer.reload_dataloaders_every_n_epochs must be 1: each round has its own batches")
    if trainer.limit_train_batches not in (1.0, None):
        raise ConfigError("trainer.limit_train_batches would cut rounds short; set federation.local_steps instead")
    if trainer.accumulate_grad_batches != 1:
        raise ConfigError("trainer.accumulate_grad_batches must be 1 (a batch must not span two clients)")
    if options.clients_per_round > dm.num_clients:
        raise ConfigError(
            f"federation.clients_per_round ({options.clients_per_round}) exceeds data.num_clients ({dm.num_clients})"
        )
    if trainer.max_epochs != options.rounds:
        raise ConfigError(f"trainer.max_epochs ({trainer.max_epochs}) must equal federation.rounds ({options.rounds})")
