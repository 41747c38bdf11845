"""Metadata-column partitioner: skew clients over a column such as task, source or category."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedlight.hookspecs import hookimpl
from fedlight.partitioners.keyed import KeyedPartitioner, KeyMode, PartitionKey

GROUP_COLUMN = "group"


class Metadata(KeyedPartitioner):
    """Skew over a metadata column (task / source / category): Dirichlet(alpha) or whole values per client.

    ``column`` names a field of every training example (the ``files`` dataset keeps the columns listed
    in its ``metadata`` option); ``column: group`` reads the dataset's group ids (e.g. the topic file
    of ``chatterbot_dialogue``). ``mode: dirichlet`` spreads each value over clients ~ Dir(alpha);
    ``mode: per_value`` deals whole values to clients (one value per client when there are as many
    clients as values).
    """

    name = "metadata"
    example_args = {"column": GROUP_COLUMN, "alpha": 0.5, "min_size": 1}

    def __init__(
        self, column: str = GROUP_COLUMN, alpha: float = 0.5, mode: KeyMode = "dirichlet", min_size: int = 2
    ) -> None:
        super().__init__(alpha, mode, min_size)
        if not column:
            raise ValueError("metadata column must be a non-empty field name")
        self.column = column

    def keys(self, examples: Sequence[dict[str, Any]], groups: np.ndarray | None, seed: int) -> PartitionKey:
        if examples and self.column in examples[0]:
            missing = [i for i, e in enumerate(examples) if e.get(self.column) in (None, "")]
            if missing:
                raise ValueError(
                    f"metadata column {self.column!r} is empty in {len(missing)} examples (e.g. #{missing[0]})"
                )
            values = [str(e[self.column]) for e in examples]
        elif self.column == GROUP_COLUMN and groups is not None:
            values = [str(g) for g in groups]
        else:
            have = sorted(examples[0]) if examples else []
            raise ValueError(
                f"metadata column {self.column!r} is not a field of the examples ({have}) "
                "and the dataset has no group ids; keep it with files.metadata or pick another column"
            )
        names, ids = np.unique(np.asarray(values), return_inverse=True)
        return PartitionKey(ids.astype(np.int64), [str(n) for n in names], self.column)


@hookimpl
def fedlight_partitioners() -> list[type]:
    return [Metadata]
