"""Length-skew partitioner: clients differ in how long their examples are."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from fedlight.hookspecs import hookimpl
from fedlight.partitioners.keyed import KeyedPartitioner, KeyMode, PartitionKey, example_text


class LengthSkew(KeyedPartitioner):
    """Length skew: examples binned by length (equal-count bins), then Dirichlet(alpha) over the bins.

    Lengths are words (or characters) of ``field`` (default ``text``, else ``prompt``) plus, for
    generation data, the ``response``: a client with short chit-chat and one with long answers see
    different data even without labels. Bins are length quantiles (ties broken by example order),
    so each holds ``~n / bins`` examples. Pair it with ``quantity_skew`` for skew in client sizes.
    """

    name = "length_skew"
    example_args = {"bins": 4, "alpha": 0.5, "min_size": 1}

    def __init__(
        self,
        bins: int = 4,
        alpha: float = 0.5,
        mode: KeyMode = "dirichlet",
        min_size: int = 2,
        field: str | None = None,
        unit: Literal["words", "chars"] = "words",
        include_response: bool = True,
    ) -> None:
        super().__init__(alpha, mode, min_size)
        if bins < 2:
            raise ValueError(f"length_skew bins must be >= 2, got {bins}")
        if unit not in ("words", "chars"):
            raise ValueError(f"length_skew unit must be 'words' or 'chars', got {unit!r}")
        self.bins, self.field, self.unit, self.include_response = bins, field, unit, include_response

    def length(self, example: dict[str, Any]) -> int:
        text = example_text(example, self.field)
        if self.include_response:
            text += " " + str(example.get("response", example.get("chosen", "")))
        return len(text.split()) if self.unit == "words" else len(text)

    def keys(self, examples: Sequence[dict[str, Any]], groups: np.ndarray | None, seed: int) -> PartitionKey:
        if len(examples) < self.bins:
            raise ValueError(f"length_skew: {len(examples)} examples cannot fill {self.bins} bins")
        lengths = np.asarray([self.length(e) for e in examples])
        order = np.argsort(lengths, kind="stable")
        ids = np.empty(len(lengths), dtype=np.int64)
        for b, chunk in enumerate(np.array_split(order, self.bins)):
            ids[chunk] = b
        names = [f"{lengths[ids == b].min()}-{lengths[ids == b].max()} {self.unit}" for b in range(self.bins)]
        return PartitionKey(ids, names, "length")


@hookimpl
def fedlight_partitioners() -> list[type]:
    return [LengthSkew]
