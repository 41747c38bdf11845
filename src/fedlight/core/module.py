"""FederatedModule: a LightningModule = Task (model, loss, metrics) + PeftMethod (what trains)."""

from __future__ import annotations

import traceback
from typing import Any, TypedDict

import lightning.pytorch as pl
import torch
from jsonargparse import lazy_instance

from fedlight.errors import ConfigError
from fedlight.evaluators.base import Evaluator
from fedlight.peft.base import PeftMethod
from fedlight.peft.lora import LoRA
from fedlight.tasks.base import Task


class ClassInit(TypedDict, total=False):
    """A class and its arguments as LightningCLI links them (``optimizer:`` → ``model.optimizer``)."""

    class_path: str
    init_args: dict[str, Any]


class FederatedModule(pl.LightningModule):
    """The model every client trains. It is built in ``setup`` once the data's label count is known.

    Args:
        task: what model, batches, loss and metrics (e.g. ``text_classification``).
        peft: which tensors train and travel (e.g. ``lora``, ``bitfit``, ``full``).
        lr: client learning rate of the default AdamW optimizer (a top-level ``optimizer:`` section
            replaces it, as in any LightningCLI).
        weight_decay: AdamW weight decay.
        evaluators: benchmark suites on local files (``multiple_choice``, ``numeric_match``,
            ``reference``, or a plugin's) scored on the global model before training, every
            ``eval_every`` rounds and after the last; columns ``val_<label>_<metric>`` in rounds.csv.
        eval_every: run the evaluators every N rounds (and always after the last round).
        optimizer: set from the top-level ``optimizer:`` section (``class_path`` + ``init_args``): the
            client optimizer, built over the trainable tensors when training starts.
        lr_scheduler: set from the top-level ``lr_scheduler:`` section.
    """

    def __init__(
        self,
        task: Task,
        peft: PeftMethod = lazy_instance(LoRA),
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        evaluators: list[Evaluator] | None = None,
        eval_every: int = 1,
        optimizer: ClassInit | None = None,
        lr_scheduler: ClassInit | None = None,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"model.lr must be > 0, got {lr}")
        if eval_every < 1:
            raise ValueError(f"model.eval_every must be >= 1, got {eval_every}")
        peft.check_family(task.family)  # fail at instantiation, before any data or training
        self.evaluators = list(evaluators or [])
        labels = [e.label for e in self.evaluators]
        if len(set(labels)) != len(labels):
            raise ValueError(f"model.evaluators: labels {labels} repeat; give each a distinct `label`")
        for evaluator in self.evaluators:
            evaluator.check_task(task)
        self.eval_every = eval_every
        self._evaluator_keys: set[str] = set()
        self.task = task
        self.peft = peft
        self.lr = lr
        self.optimizer_init, self.lr_scheduler_init = optimizer, lr_scheduler
        self.weight_decay = weight_decay
        self.model: torch.nn.Module | None = None
        self.num_classes: int | None = None
        self.skip_client: int | None = None  # a client that raised: its remaining batches are skipped
        self._client_error: str | None = None
        #: set by the federation callback for per-example privacy (DP-SGD): (model, task, batch) -> StepOutput
        self.private_step = None
        #: set by the federation callback under unit execution: trains a round's work units of clients
        self.run_units: Any = None
        self._eval_loss: dict[str, tuple[torch.Tensor, int]] = {}  # prefix -> (Σ loss·n, Σ n) of an evaluation
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
            self.task.check_model(self.model)
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
        """Train mode, except BatchNorm layers whose scale is frozen (all of it, or all but the bias as in
        BitFit): their running statistics are part of the frozen backbone and stay as they are, instead of
        drifting on each client without ever travelling."""
        super().train(mode)
        if mode and self.model is not None:
            for module in self.model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not (
                    module.weight is not None and module.weight.requires_grad
                ):
                    module.eval()
        return self

    @property
    def net(self) -> torch.nn.Module:
        """The built model (``model`` is None until ``build``, which ``setup`` calls before any step)."""
        assert self.model is not None, "FederatedModule.build() runs in setup, before any step or evaluation"
        return self.model

    @property
    def classes(self) -> int:
        assert self.num_classes is not None, "FederatedModule.build() sets num_classes"
        return self.num_classes

    @property
    def shared_names(self) -> list[str]:
        return self.peft.shared_names(self.net)

    @property
    def local_names(self) -> list[str]:
        return self.peft.local_names(self.net)

    def frozen_names(self) -> list[str]:
        return [n for n, p in self.net.named_parameters() if not p.requires_grad]

    # --- steps ----------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        """One local step; a client whose step raises is isolated (None skips the optimizer step).

        Under ``federation.execution: sequential | grouped`` the one batch of a round holds its work units
        of whole clients, which the federation callback's executor trains (``run_units``); Lightning's own
        step is then empty.
        """
        if "units" in batch:
            assert self.run_units is not None, "the federation callback's executor sets run_units"
            self.run_units(batch["units"])
            return None
        client = int(batch["client_id"][0]) if "client_id" in batch else None
        if client is not None and client == self.skip_client:
            return None
        try:
            if self.private_step is not None:  # sample-level DP-SGD: the loss's gradient is the private one
                out = self.private_step(self.model, self.task, batch)
            else:
                out = self.task.step(self.net, batch)
        except Exception:
            if client is None:
                raise
            self.skip_client, self._client_error = client, traceback.format_exc()
            return None
        # no per-step self.log: it cost ~2.4 ms a step (about half of a tiny model's step, see
        # docs/performance.md); the round's mean train_loss is the engine's (rounds.csv and the loggers)
        return out.loss

    def pop_client_error(self) -> str | None:
        """The traceback of the last client step that raised, once."""
        error, self._client_error = self._client_error, None
        return error

    def _eval_step(self, batch: dict[str, Any], metrics, prefix: str) -> None:
        out = self.task.step(self.net, batch)
        metrics.update(out.preds, out.target)
        # the batch-size-weighted mean loss, summed as Lightning's on_epoch mean sums it but logged once per
        # epoch (_log_eval_loss): a self.log per batch cost ~1.5 ms, more than a tiny model's eval batch
        loss = out.loss.detach()
        loss = loss if loss.dtype in (torch.float32, torch.float64) else loss.float()
        total, count = self._eval_loss.get(prefix, (torch.tensor(0.0, device=loss.device), 0))
        self._eval_loss[prefix] = (total + loss * len(out.target), count + len(out.target))

    def _log_eval_loss(self, prefix: str) -> None:
        summed = self._eval_loss.pop(prefix, None)
        if summed is not None:  # an evaluation of at least one batch
            total, count = summed
            self.log(
                f"{prefix}loss",
                total / torch.tensor(count, device=total.device),
                prog_bar=prefix == "val_",
                batch_size=1,
            )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val_")

    def generation_metrics(self, prefix: str = "val_", round_idx: int | None = None) -> dict[str, float]:
        """Generative metrics on the validation split plus the evaluators' when due (see :meth:`evaluators_due`).

        Samples (the task's (prompt, generation, reference) triples, then each evaluator's dicts with
        an ``evaluator`` field) are kept in ``last_samples`` for ``samples.jsonl``.
        """
        result = self.task.generate_eval(self.net, list(self.trainer.datamodule.splits.val))
        out: dict[str, float] = {}
        samples: list = []
        if result is not None:
            out.update({f"{prefix}{k}": v for k, v in result.metrics.items()})
            samples.extend(result.samples)
        if self.evaluators and self.evaluators_due(round_idx):
            metrics, extra = self.run_evaluators(prefix)
            out.update(metrics)
            samples.extend(extra)
        if result is not None or self.evaluators:
            self.last_samples = samples
        return out

    def evaluators_due(self, round_idx: int | None) -> bool:
        """Evaluators run on explicit evaluations (``round_idx`` None: round 0, ``fedlight evaluate``, Flower),
        every ``eval_every`` rounds and after the last one."""
        if round_idx is None:
            return True
        last = (
            self._trainer is not None and self.trainer.max_epochs is not None and round_idx >= self.trainer.max_epochs
        )
        return round_idx % self.eval_every == 0 or last

    @torch.no_grad()
    def run_evaluators(self, prefix: str = "val_") -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Every evaluator on the current model (in eval mode): ``{prefix}<label>_<metric>`` and samples."""
        was_training = self.net.training
        self.net.eval()
        metrics: dict[str, float] = {}
        samples: list[dict[str, Any]] = []
        try:
            for evaluator in self.evaluators:
                result = evaluator.evaluate(self.task, self.net)
                metrics.update({f"{prefix}{evaluator.label}_{k}": float(v) for k, v in result.metrics.items()})
                samples.extend({"evaluator": evaluator.label, **s} for s in result.samples)
        finally:
            if was_training:  # train mode through train(): frozen-scale BatchNorm stays in eval
                self.train()
        self._evaluator_keys.update(metrics)
        return metrics, samples

    def on_validation_epoch_start(self) -> None:
        self._eval_loss.pop("val_", None)  # nothing of an evaluation that did not finish

    def on_test_epoch_start(self) -> None:
        self._eval_loss.pop("test_", None)

    def on_validation_epoch_end(self) -> None:
        self._log_eval_loss("val_")
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        self.val_metrics.reset()
        if not self.trainer.sanity_checking:
            round_idx = self.trainer.current_epoch + 1 if self.trainer.state.fn == "fit" else None
            if self.evaluators and not self.evaluators_due(round_idx):
                # Lightning keeps the last logged value of a key: drop the evaluators' so a round they
                # did not run on has empty cells in rounds.csv, not the previous round's numbers
                for key in self._evaluator_keys:
                    self.trainer.callback_metrics.pop(key, None)
            self.log_dict(self.generation_metrics(round_idx=round_idx))

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test_")

    def on_test_epoch_end(self) -> None:
        self._log_eval_loss("test_")
        self.log_dict(self.test_metrics.compute())
        self.test_metrics.reset()

    @torch.no_grad()
    def evaluate(self, loader, prefix: str = "val_", generate: bool = True) -> dict[str, float]:
        """Metrics of the current model on a loader outside Lightning's loops (the round-0 baseline).

        ``generate=False`` skips the generative metrics, which always run on the validation split
        (not on ``loader``), e.g. for per-client personalised evaluation.
        """
        was_training = self.net.training
        self.net.eval()
        metrics = self.task.metrics(self.classes).clone(prefix=prefix).to(self.device)
        total, count = 0.0, 0
        for batch in loader:
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            out = self.task.step(self.net, batch)
            metrics.update(out.preds, out.target)
            total += float(out.loss) * len(out.target)
            count += len(out.target)
        results = {f"{prefix}loss": total / max(count, 1), **{k: float(v) for k, v in metrics.compute().items()}}
        if generate:
            results.update(self.generation_metrics(prefix))
        if was_training:  # train mode through train(): frozen-scale BatchNorm stays in eval
            self.train()
        return results

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep trainable tensors and buffers; drop frozen parameters unless the method merges into them
        or a merging aggregator changed them (``kept_frozen``)."""
        if self.peft.merges_into_base:
            return
        frozen = {f"model.{n}" for n in self.frozen_names() if n not in self.kept_frozen}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}

    def make_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        """The client optimizer over ``params``: AdamW(lr, weight_decay), or the config's ``optimizer:`` section."""
        if self.optimizer_init is None:
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        from lightning.pytorch.cli import instantiate_class

        return instantiate_class(params, dict(self.optimizer_init))

    def configure_optimizers(self):
        """Client optimizer over the trainable tensors (:meth:`make_optimizer`) and the ``lr_scheduler:`` section."""
        optimizer = self.make_optimizer([p for p in self.net.parameters() if p.requires_grad])
        if self.lr_scheduler_init is None:
            return optimizer
        from lightning.pytorch.cli import LightningCLI, instantiate_class

        scheduler = instantiate_class(optimizer, dict(self.lr_scheduler_init))
        return LightningCLI.configure_optimizers(self, optimizer, scheduler)
