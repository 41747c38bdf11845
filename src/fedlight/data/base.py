"""The dataset plugin kind."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedlight.core.plugin_base import Plugin

Example = dict[str, Any]


@dataclass
class DatasetSplits:
    """Train/validation examples plus the label vocabulary.

    Examples are plain dicts (``{"text": str, "label": int}``, ``{"image": Tensor, "label": int}``,
    ``{"prompt": str, "response": str}``); a task's collate function turns them into batches.
    ``groups`` optionally carries a natural client id per training example (e.g. a writer id).
    """

    train: Sequence[Example]
    val: Sequence[Example]
    label_names: list[str] = field(default_factory=list)
    groups: Sequence[Any] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def train_labels(self) -> np.ndarray:
        return np.asarray([ex.get("label", 0) for ex in self.train], dtype=np.int64)


class Dataset(Plugin):
    """Base class: load labelled examples from a local source, never from a hub."""

    def load(self) -> DatasetSplits:
        raise NotImplementedError


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of ``range(n)`` into train and validation indices."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def digit_image_splits(images: Any, labels: Sequence[int], val_fraction: float, seed: int) -> DatasetSplits:
    """Image/label examples of a 10-class digit dataset, split seeded into train and validation."""
    train_idx, val_idx = split_train_val(len(labels), val_fraction, seed)

    def pick(idx: np.ndarray) -> list[Example]:
        return [{"image": images[i], "label": int(labels[i])} for i in idx]

    return DatasetSplits(train=pick(train_idx), val=pick(val_idx), label_names=[str(d) for d in range(10)])
