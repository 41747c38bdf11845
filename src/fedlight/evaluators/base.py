"""The evaluator plugin kind: a benchmark on a local file, scored on the global model.

An evaluator reads its items once, at construction (so a missing or malformed file fails before
round 1), and :meth:`Evaluator.evaluate` scores a model through the task's public scoring and
generation methods (:meth:`fedlight.tasks.causal_lm.CausalLM.score`, ``generate``, ``lm_step``).
Its metrics become ``val_<label>_<metric>`` columns of ``rounds.csv``; its samples go to
``samples.jsonl`` with an ``evaluator`` field.
"""

from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from fedlight.core.plugin_base import Plugin

EXAMPLE_PREFIX = "example:"


def resolve_data_path(path: str) -> Path:
    """A local file, or ``example:NAME`` for a file shipped in ``fedlight/data/examples/``."""
    if path.startswith(EXAMPLE_PREFIX):
        name = path[len(EXAMPLE_PREFIX) :]
        root = importlib.resources.files("fedlight.data") / "examples"
        shipped = sorted(p.name for p in root.iterdir() if p.name.endswith(".jsonl"))
        if name not in shipped:
            raise FileNotFoundError(f"no shipped example file {name!r}; available: {', '.join(shipped)}")
        return Path(str(root / name))
    return Path(path).expanduser()


@dataclass
class EvalResult:
    """Metrics (means in [0, 1] unless the name says otherwise) and a few samples to read."""

    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)


class Evaluator(Plugin):
    """Base class: score a model on the items of a local JSONL file.

    Args (shared by the built-ins):
        path: a local JSONL file or ``example:<file>`` (one shipped with fedlight).
        label: column prefix (``val_<label>_<metric>``); defaults to the evaluator's name.
        max_examples: score at most this many items (the first ones); null = all.
        num_samples: how many scored items go to ``samples.jsonl`` per evaluation.
    """

    #: the task methods this evaluator calls (checked before training)
    needs: tuple[str, ...] = ("score",)
    #: the columns every item must have
    columns: tuple[str, ...] = ()

    def __init__(
        self, path: str, label: str | None = None, max_examples: int | None = None, num_samples: int = 3
    ) -> None:
        if max_examples is not None and max_examples < 1:
            raise ValueError(f"{self.name} max_examples must be >= 1 or null, got {max_examples}")
        if num_samples < 0:
            raise ValueError(f"{self.name} num_samples must be >= 0, got {num_samples}")
        self.label = label or self.name
        if not re.fullmatch(r"[A-Za-z0-9_]+", self.label):
            raise ValueError(f"{self.name} label {self.label!r} must be letters, digits or '_' (it names csv columns)")
        self.path = path
        self.max_examples = max_examples
        self.num_samples = num_samples
        self.items = [self.check_item(i, row) for i, row in enumerate(self._read(), 1)][:max_examples]

    def _read(self) -> list[dict[str, Any]]:
        from fedlight.data.files import read_rows

        path = resolve_data_path(self.path)
        try:
            rows = read_rows(path, "jsonl", "path")
        except (ValueError, FileNotFoundError) as err:
            raise type(err)(f"{self.name} evaluator: {str(err).removeprefix('files.path: ')}") from None
        return rows

    def check_item(self, lineno: int, row: dict[str, Any]) -> dict[str, Any]:
        """Validate (and normalise) one item; the error names the line and the column to fix."""
        for column in self.columns:
            if row.get(column) in (None, ""):
                raise ValueError(f"{self.name} evaluator: {self.path} item {lineno} has no {column!r}")
        return row

    def check_task(self, task: Any) -> None:
        """Refuse, before training, a task that lacks the scoring methods this evaluator calls."""
        missing = [m for m in self.needs if not callable(getattr(task, m, None))]
        if missing:
            raise ValueError(
                f"evaluator {self.name!r} needs a generative LM task (causal_lm, dpo); "
                f"task {getattr(task, 'name', type(task).__name__)!r} has no {', '.join(missing)}"
            )

    def evaluate(self, task: Any, model: nn.Module) -> EvalResult:
        raise NotImplementedError
