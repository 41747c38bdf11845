"""FederatedDataModule: a dataset split over clients, served one round at a time.

Each round's training loader yields the sampled clients' local batches in turn (client after
client), every example tagged with its client id, so the round callback can tell where one client's
local training ends and the next begins.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, cast

import lightning.pytorch as pl
import numpy as np
import torch
from jsonargparse import lazy_instance
from torch.utils.data import DataLoader, Sampler

from fedlight.core.plan import RoundPlan
from fedlight.core.seeds import batch_rng, resolve_seed
from fedlight.data.base import Dataset, DatasetSplits, Example
from fedlight.errors import ConfigError
from fedlight.partitioners.base import Partitioner
from fedlight.partitioners.iid import IID


class ClientTaggedDataset(torch.utils.data.Dataset):
    """Index with ``(client_id, example_index)``; returns the example plus its client id."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int]) -> Example:
        client_id, index = key
        return {**self.examples[index], "client_id": client_id}


def collate_with_client(collate: Callable[[list[Example]], dict[str, Any]], examples: list[Example]) -> dict[str, Any]:
    batch = collate(examples)
    batch["client_id"] = torch.tensor([e["client_id"] for e in examples])
    return batch


class _Examples(torch.utils.data.IterableDataset):
    """A list of examples as an iterable dataset (Lightning does not shard iterable datasets over ranks)."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)


def _as_is(item: Any) -> Any:
    return item


class RoundBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of one round: each sampled client's local steps in turn, reshuffled per epoch of its data.

    With ``plan.batches == "subsample"`` every step is instead an independent uniform draw of
    ``batch_size`` of the client's examples without replacement (see ``RoundPlan``).
    """

    def __init__(self, plan: RoundPlan, client_indices: Sequence[np.ndarray], batch_size: int, seed: int) -> None:
        self.plan = plan
        self.client_indices = client_indices
        self.batch_size = batch_size
        self.seed = seed

    def __len__(self) -> int:
        return self.plan.total_steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for client, steps in zip(self.plan.training, self.plan.steps):
            yield from self.client_batches(client, steps)

    def client_batches(self, client: int, steps: int) -> Iterator[list[tuple[int, int]]]:
        """Client ``client``'s ``steps`` local batches of this round (its own seeded order)."""
        indices = self.client_indices[client]
        rng = batch_rng(self.seed, self.plan.round, client)
        size = min(self.batch_size, len(indices))
        if self.plan.batches == "subsample":  # each step independent (what DP-SGD's accountant assumes)
            for _ in range(steps):
                yield [(client, int(i)) for i in rng.choice(indices, size=size, replace=False)]
            return
        order = rng.permutation(indices)
        pos = 0
        for _ in range(steps):
            if pos + size > len(order):
                order, pos = rng.permutation(indices), 0
            yield [(client, int(i)) for i in order[pos : pos + size]]
            pos += size


class RoundUnits(torch.utils.data.IterableDataset):
    """A round as work units for the engine's executors (``federation.execution`` other than ``steps``).

    Its one item, ``{"units": self}``, is the whole round (of this rank) as one Lightning batch: Lightning's
    per-batch work (hooks, fetching, transfer) happens once per round, not once per client. Iterating it
    yields unit ``u`` as ``[(client id, [collated batch of each local step]), ...]`` — one client
    (``sequential``) or a group of clients (``grouped``) with exactly the batches the ``steps`` loader
    would give them, collated when the executor reaches it (one unit's batches in memory at a time).
    It is not a ``Sequence``, so Lightning passes it through to the training step untouched.
    """

    def __init__(
        self,
        sampler: RoundBatchSampler,
        units: Sequence[Sequence[int]],
        dataset: ClientTaggedDataset,
        collate: Callable[[list[Example]], dict[str, Any]],
    ) -> None:
        self.sampler, self.units, self.dataset, self.collate = sampler, units, dataset, collate

    def __len__(self) -> int:
        return 1  # Lightning batches: the round

    def __iter__(self) -> Iterator[Any]:
        # iterable: Lightning never re-samples it (on several devices each rank's units are its own already)
        return iter([{"units": self}])

    def work(self) -> Iterator[list[tuple[int, list[dict[str, Any]]]]]:
        """The round's work units in order, each collated when it is reached."""
        return (self.unit(u) for u in range(len(self.units)))

    def unit(self, u: int) -> list[tuple[int, list[dict[str, Any]]]]:
        plan, out = self.sampler.plan, []
        for k in self.units[u]:
            client = plan.training[k]
            batches = [
                collate_with_client(self.collate, [self.dataset[key] for key in keys])
                for keys in self.sampler.client_batches(client, plan.steps[k])
            ]
            out.append((client, batches))
        return out


class FederatedDataModule(pl.LightningDataModule):
    """A dataset plugin partitioned over ``num_clients`` simulated clients.

    Args:
        dataset: where the examples come from (e.g. ``chatterbot``, ``digits``).
        partitioner: how training examples are split over clients (e.g. ``iid``, ``dirichlet``).
        num_clients: number of clients in the federation.
        batch_size: local training batch size.
        eval_batch_size: batch size of the server-side validation of the global model.
        seed: partition seed; defaults to ``seed_everything``'s seed.
    """

    def __init__(
        self,
        dataset: Dataset,
        partitioner: Partitioner = lazy_instance(IID),
        num_clients: int = 10,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if num_clients < 1:
            raise ValueError(f"data.num_clients must be >= 1, got {num_clients}")
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError("data.batch_size and data.eval_batch_size must be >= 1")
        self.dataset = dataset
        self.partitioner = partitioner
        self.num_clients = num_clients
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.splits: DatasetSplits | None = None
        self.client_indices: list[np.ndarray] = []
        self._planner: Callable[[int], RoundPlan] | None = None
        #: how a round's planned clients are cut into work units (None: one Lightning batch per local step)
        self._units: Callable[[RoundPlan], list[list[int]]] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        try:
            self.splits = self.dataset.load()
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"data.dataset ({self.dataset.name}): {err}") from err
        if not self.splits.train:
            raise ConfigError(f"data.dataset: {self.dataset.name!r} has no training examples")
        try:
            self.client_indices = self.partitioner(
                self.splits.train_labels(), self.num_clients, resolve_seed(self.seed), groups=self.splits.groups,
                examples=self.splits.train,
            )  # fmt: skip
        except ValueError as err:
            raise ConfigError(f"data.partitioner ({self.partitioner.name}): {err}") from err

    @property
    def num_classes(self) -> int:
        assert self.splits is not None, "call setup() first"
        return self.splits.num_classes

    @property
    def client_sizes(self) -> list[int]:
        return [len(ix) for ix in self.client_indices]

    def set_planner(
        self, planner: Callable[[int], RoundPlan], units: Callable[[RoundPlan], list[list[int]]] | None = None
    ) -> None:
        """The round callback hands over how to plan round r (1-based), and how to cut it into work units."""
        self._planner, self._units = planner, units

    def _task_collate(self):
        return self.trainer.lightning_module.task.collate

    def train_dataloader(self) -> DataLoader:
        if self._planner is None:
            raise RuntimeError("no round planner: add the `federation:` section (FederatedRound callback)")
        plan = self._planner(self.trainer.current_epoch + 1)
        sampler = RoundBatchSampler(plan, self.client_indices, self.batch_size, resolve_seed(self.seed))
        if self._units is not None:
            units = RoundUnits(
                sampler, self._units(plan), ClientTaggedDataset(self.data_splits.train), self._task_collate()
            )
            return DataLoader(units, batch_size=None, collate_fn=_as_is)
        return DataLoader(
            ClientTaggedDataset(self.data_splits.train),
            batch_sampler=sampler,
            collate_fn=partial(collate_with_client, self._task_collate()),
        )

    @property
    def data_splits(self) -> DatasetSplits:
        assert self.splits is not None, "FederatedDataModule.setup() loads the splits"
        return self.splits

    def val_dataloader(self) -> DataLoader:
        val = cast(torch.utils.data.Dataset, list(self.data_splits.val))  # a list is a map-style dataset
        if self.trainer is not None and self.trainer.world_size > 1:  # every rank validates the same global model
            val = _Examples(self.data_splits.val)  # on all of it, so no rank's metrics depend on a shard
        return DataLoader(val, batch_size=self.eval_batch_size, collate_fn=self._task_collate())

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
