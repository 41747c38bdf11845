"""Natural-id partitioner."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from fedlight.hookspecs import hookimpl
from fedlight.partitioners.base import Partitioner


class NaturalId(Partitioner):
    """Natural partition: one client per group id (writer, speaker, user), as in LEAF (Caldas et al. 2018).

    Needs per-example group ids (``DatasetSplits.groups``, passed as ``groups=``). With as many clients
    as groups each group is one client; with fewer clients, whole groups are shuffled (seeded) and dealt
    in turn, so a client holds ``floor(G/N)`` or ``ceil(G/N)`` groups and no group is ever split.
    More clients than groups is an error.
    """

    name = "natural_id"
    #: capability: the partitioner must be given ``groups=`` (see the base-class proposal in docs/aggregation.md)
    needs_groups: ClassVar[bool] = True

    def split(
        self, labels: np.ndarray, num_clients: int, seed: int, groups: Sequence[Any] | np.ndarray | None = None
    ) -> list[np.ndarray]:
        if groups is None:
            raise ValueError(
                "natural_id partitioner needs per-example group ids, but the dataset provides none "
                "(DatasetSplits.groups); pick a dataset with natural clients or another partitioner"
            )
        groups = np.asarray(groups)
        if len(groups) != len(labels):
            raise ValueError(f"natural_id: {len(groups)} group ids for {len(labels)} training examples")
        ids, inverse = np.unique(groups, return_inverse=True)
        if num_clients > len(ids):
            raise ValueError(f"natural_id: num_clients ({num_clients}) exceeds the {len(ids)} distinct group ids")
        members = [np.flatnonzero(inverse == g) for g in range(len(ids))]
        order = np.random.default_rng(seed).permutation(len(ids))
        return [np.concatenate([members[g] for g in order[i::num_clients]]) for i in range(num_clients)]


@hookimpl
def fedlight_partitioners() -> list[type]:
    return [NaturalId]
