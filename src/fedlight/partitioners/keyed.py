"""Label-free partitioning: a key per example (topic cluster, metadata value, length bin), then a split over keys.

Unlabelled instruction data has no class to skew, so these partitioners compute a *partition key* from
the examples themselves and skew clients over it exactly as label skew does over classes: ``mode:
dirichlet`` spreads each key value over clients with proportions ~ Dir(alpha) (the
:class:`~fedlight.partitioners.dirichlet.Dirichlet` split, reused on the keys), ``mode: per_value``
deals whole key values to clients (the :class:`~fedlight.partitioners.natural_id.NaturalId` split: with
as many clients as values, one value per client). ``fedlight partitions`` shows per-client histograms
of the key (:meth:`KeyedPartitioner.partition_key`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from fedlight.partitioners.base import Partitioner
from fedlight.partitioners.dirichlet import Dirichlet
from fedlight.partitioners.natural_id import NaturalId

KeyMode = Literal["dirichlet", "per_value"]
#: text fields tried in order when ``field`` is not set: classification text, then the instruction
TEXT_FIELDS = ("text", "prompt", "question")


@dataclass(frozen=True)
class PartitionKey:
    """The key a label-free partitioner splits on: an id per training example and a name per id."""

    ids: np.ndarray
    names: list[str]
    title: str

    @property
    def num_values(self) -> int:
        return len(self.names)


def example_text(example: dict[str, Any], field: str | None) -> str:
    """The text a partitioner reads from one example: ``field``, else the first of :data:`TEXT_FIELDS`."""
    if field is not None:
        if field not in example:
            raise ValueError(f"examples have no field {field!r} (they have {sorted(example)}); set `field`")
        return str(example[field])
    for name in TEXT_FIELDS:
        if name in example:
            return str(example[name])
    raise ValueError(
        f"examples have none of the text fields {list(TEXT_FIELDS)} (they have {sorted(example)}); set `field`"
    )


class KeyedPartitioner(Partitioner):
    """Base: skew clients over a key computed from the examples (subclasses implement :meth:`keys`)."""

    needs_examples: ClassVar[bool] = True

    def __init__(self, alpha: float = 0.5, mode: KeyMode = "dirichlet", min_size: int = 2) -> None:
        if mode not in ("dirichlet", "per_value"):
            raise ValueError(f"{self.name} mode must be 'dirichlet' or 'per_value', got {mode!r}")
        self._dirichlet = Dirichlet(alpha=alpha, min_size=min_size)  # validates alpha and min_size
        self.alpha, self.mode, self.min_size = alpha, mode, min_size
        self._cache: tuple[tuple[int, int, int], PartitionKey] | None = None

    def keys(self, examples: Sequence[dict[str, Any]], groups: np.ndarray | None, seed: int) -> PartitionKey:
        raise NotImplementedError

    def partition_key(
        self, examples: Sequence[dict[str, Any]], groups: Sequence[Any] | np.ndarray | None = None, seed: int = 0
    ) -> PartitionKey:
        """The key of every example (cached for the same examples and seed: the report reuses the split's)."""
        token = (id(examples), len(examples), int(seed))
        if self._cache is None or self._cache[0] != token:
            key = self.keys(examples, None if groups is None else np.asarray(groups), int(seed))
            if len(key.ids) != len(examples):
                raise ValueError(f"{self.name}: {len(key.ids)} keys for {len(examples)} examples")
            self._cache = (token, key)
        return self._cache[1]

    def split(
        self,
        labels: np.ndarray,
        num_clients: int,
        seed: int,
        examples: Sequence[dict[str, Any]] | None = None,
        groups: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        if examples is None:
            raise ValueError(f"{self.name} partitioner needs the training examples")
        key = self.partition_key(examples, groups, seed)
        if self.mode == "per_value":
            if num_clients > key.num_values:
                raise ValueError(
                    f"mode per_value: num_clients ({num_clients}) exceeds the {key.num_values} distinct "
                    f"{key.title} values; use fewer clients or mode: dirichlet"
                )
            return NaturalId().split(key.ids, num_clients, seed, groups=key.ids)
        return self._dirichlet.split(key.ids, num_clients, seed)
