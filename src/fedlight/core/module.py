"""FederatedModule: a LightningModule = Task (model, loss, metrics) + PeftMethod (what trains)."""

from __future__ import annotations

import traceback
from typing import Any

import lightning.pytorch as pl
import torch
from jsonargparse import lazy_instance

from fedlight.errors import ConfigError
from fedlight.peft.base import PeftMethod
from fedlight.peft.lora import LoRA
from fedlight.tasks.base import Task


class FederatedModule(pl.LightningModule):
    """The model every client trains. It is built in ``setup`` once the data's label count is known.

    Args:
        task: what model, batches, loss and metrics (e.g. ``text_classification``).
        peft: which tensors train and travel (e.g. ``lora``, ``bitfit``, ``full``).
        lr: client learning rate of the default AdamW optimizer (a top-level ``optimizer:`` section
            replaces it, as in any LightningCLI).
        weight_decay: AdamW weight decay.
    """

    def __init__(
        self, task: Task, peft: PeftMethod = lazy_instance(LoRA), lr: float = 1e-3, weight_decay: float = 0.0
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"model.lr must be > 0, got {lr}")
        peft.check_family(task.family)  # fail at instantiation, before any data or training
        self.task = task
        self.peft = peft
        self.lr = lr
        self.weight_decay = weight_decay
        self.model: torch.nn.Module | None = None
        self.num_classes: int | None = None
        self.skip_client: int | None = None  # a client that raised: its remaining batches are skipped
        self._client_error: str | None = None
        #: set by the federation callback for per-example privacy (DP-SGD): (model, task, batch) -> StepOutput
        self.private_step = None
        # round checkpoints omit the frozen backbone (rebuilt from its source), see on_save_checkpoint
        self.strict_loading = False
        #: frozen weights a merging aggregator changed (set by the federation callback): checkpointed
        self.kept_frozen: set[str] = set()

    # --- building -------------------------------------------------------------------------------

    def build(self, num_classes: int) -> None:
        if self.model is not None:
            return
        try:
            model = self.task.build_model(num_classes)
            self.model = self.peft.apply(model, self.task.family, self.task.head_modules(model))
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"model ({self.task.name} + {self.peft.name}): {err}") from err
        self.train()  # from_pretrained returns eval mode; clients train with dropout on
        self.num_classes = num_classes
        self.last_samples: list[tuple[str, str, str]] = []
        self.val_metrics = self.task.metrics(num_classes).clone(prefix="val_")
        self.test_metrics = self.task.metrics(num_classes).clone(prefix="test_")

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "num_classes"):
            raise ValueError("FederatedModule needs a FederatedDataModule (the `data:` section)")
        self.build(datamodule.num_classes)

    def train(self, mode: bool = True) -> FederatedModule:
        """Train mode, except BatchNorm layers whose parameters are frozen: their statistics stay frozen too."""
        super().train(mode)
        if mode and self.model is not None:
            for module in self.model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in module.parameters(recurse=False)
                ):
                    module.eval()
        return self

    @property
    def shared_names(self) -> list[str]:
        return self.peft.shared_names(self.model)

    @property
    def local_names(self) -> list[str]:
        return self.peft.local_names(self.model)

    def frozen_names(self) -> list[str]:
        return [n for n, p in self.model.named_parameters() if not p.requires_grad]

    # --- steps ----------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        """One local step; a client whose step raises is isolated (None skips the optimizer step)."""
        client = int(batch["client_id"][0]) if "client_id" in batch else None
        if client is not None and client == self.skip_client:
            return None
        try:
            if self.private_step is not None:  # sample-level DP-SGD: the loss's gradient is the private one
                out = self.private_step(self.model, self.task, batch)
            else:
                out = self.task.step(self.model, batch)
        except Exception:
            if client is None:
                raise
            self.skip_client, self._client_error = client, traceback.format_exc()
            return None
        self.log("train_loss", out.loss, prog_bar=True, batch_size=len(out.target))
        return out.loss

    def pop_client_error(self) -> str | None:
        """The traceback of the last client step that raised, once."""
        error, self._client_error = self._client_error, None
        return error

    def _eval_step(self, batch: dict[str, Any], metrics, prefix: str) -> None:
        out = self.task.step(self.model, batch)
        metrics.update(out.preds, out.target)
        self.log(f"{prefix}loss", out.loss, on_epoch=True, prog_bar=prefix == "val_", batch_size=len(out.target))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val_")

    def generation_metrics(self, prefix: str = "val_") -> dict[str, float]:
        """Generative metrics of the current model on the validation split (empty for non-generative tasks)."""
        result = self.task.generate_eval(self.model, list(self.trainer.datamodule.splits.val))
        if result is None:
            return {}
        self.last_samples = result.samples
        return {f"{prefix}{k}": v for k, v in result.metrics.items()}

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        self.val_metrics.reset()
        if not self.trainer.sanity_checking:
            self.log_dict(self.generation_metrics())

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test_")

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute())
        self.test_metrics.reset()

    @torch.no_grad()
    def evaluate(self, loader, prefix: str = "val_", generate: bool = True) -> dict[str, float]:
        """Metrics of the current model on a loader outside Lightning's loops (the round-0 baseline).

        ``generate=False`` skips the generative metrics, which always run on the validation split
        (not on ``loader``), e.g. for per-client personalised evaluation.
        """
        was_training = self.model.training
        self.model.eval()
        metrics = self.task.metrics(self.num_classes).clone(prefix=prefix).to(self.device)
        total, count = 0.0, 0
        for batch in loader:
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            out = self.task.step(self.model, batch)
            metrics.update(out.preds, out.target)
            total += float(out.loss) * len(out.target)
            count += len(out.target)
        results = {f"{prefix}loss": total / max(count, 1), **{k: float(v) for k, v in metrics.compute().items()}}
        if generate:
            results.update(self.generation_metrics(prefix))
        self.model.train(was_training)
        return results

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep trainable tensors and buffers; drop frozen parameters unless the method merges into them
        or a merging aggregator changed them (``kept_frozen``)."""
        if self.peft.merges_into_base:
            return
        frozen = {f"model.{n}" for n in self.frozen_names() if n not in self.kept_frozen}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
