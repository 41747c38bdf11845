"""The partitioner plugin kind."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from fedlight.core.plugin_base import Plugin


class Partitioner(Plugin):
    """Base class: split example indices into ``num_clients`` disjoint lists, deterministically."""

    #: True for partitioners that split by a natural id (``DatasetSplits.groups``) instead of labels
    needs_groups: ClassVar[bool] = False
    #: True for label-free partitioners that compute their key from the training examples themselves
    #: (topic clusters, a metadata column, lengths); they are given ``examples=`` and ``groups=``
    needs_examples: ClassVar[bool] = False

    def split(self, labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
        raise NotImplementedError

    def __call__(
        self,
        labels: np.ndarray,
        num_clients: int,
        seed: int,
        groups: Sequence[Any] | None = None,
        examples: Sequence[dict[str, Any]] | None = None,
    ) -> list[np.ndarray]:
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        if num_clients > len(labels):
            raise ValueError(f"num_clients ({num_clients}) exceeds the number of training examples ({len(labels)})")
        if self.needs_groups and groups is None:
            raise ValueError(f"{self.name} partitioner needs per-example group ids; this dataset provides none")
        extra: dict[str, Any] = {"groups": np.asarray(groups)} if self.needs_groups else {}
        if self.needs_examples:
            if examples is None:
                raise ValueError(f"{self.name} partitioner splits by the examples' content; it was given none")
            if len(examples) != len(labels):
                raise ValueError(f"{self.name}: {len(examples)} examples for {len(labels)} labels")
            extra.update(examples=examples, groups=None if groups is None else np.asarray(groups))
        parts = [
            np.sort(np.asarray(p, dtype=np.int64)) for p in self.split(np.asarray(labels), num_clients, seed, **extra)
        ]
        empty = [i for i, p in enumerate(parts) if len(p) == 0]
        if empty:
            raise ValueError(
                f"{self.name} partitioner left clients {empty[:10]} without data; "
                "use fewer clients or a less skewed setting"
            )
        return parts
