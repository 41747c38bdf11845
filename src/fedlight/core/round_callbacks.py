"""Round checkpoints and adapter exports: ordinary Lightning callbacks that the federation callback adds.

They run after ``FederatedRound`` at every round end (so the round's row is already in the history
they save) and read the round from its engine.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from fedlight.core.checkpoint import atomic_copy
from fedlight.core.export import export_adapter


def _due(every: int, round_idx: int, rounds: int) -> bool:
    return bool(every) and (round_idx % every == 0 or round_idx == rounds)


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
        if _due(self.every, r, self.federation.rounds) and trainer.is_global_zero:
            out = self.federation.log_dir(trainer) / "adapters" / f"round-{r:04d}"
            export_adapter(pl_module, out, merged=self.merged, base_delta=self.federation.engine.frozen_changes())
