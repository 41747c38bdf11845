"""Personalised evaluation: each client's model (global shared + its own local tensors) on its own held-out data.

Held-out data per client: the validation split is divided over the clients *label-matched* to their
training shards. For every class c, the validation examples of c are shuffled (seeded) and dealt to
the clients in proportion to how many training examples of c each client holds (largest remainders).
So a client's held-out share follows its own label distribution (what it would see at test time)
while every validation example is used exactly once and the training data stay untouched. Re-running
the partitioner on the validation labels would not do this: e.g. a Dirichlet draw on different label
counts gives each client different class proportions than it trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np
from torch.utils.data import DataLoader, Dataset

from fedlight.core.seeds import Purpose, run_rng
from fedlight.core.state import State


def label_matched_split(
    client_indices: Sequence[np.ndarray], train_labels: np.ndarray, val_labels: np.ndarray, seed: int
) -> list[np.ndarray]:
    """Validation indices per client, each client's share following its training label counts."""
    num_clients = len(client_indices)
    classes = int(max(train_labels.max(initial=0), val_labels.max(initial=0))) + 1
    counts = np.zeros((num_clients, classes), dtype=np.int64)
    for k, ix in enumerate(client_indices):
        if len(ix):
            counts[k] = np.bincount(train_labels[np.asarray(ix, dtype=np.int64)], minlength=classes)
    rng = run_rng(seed, Purpose.PERSONAL_SPLIT)
    shares: list[list[int]] = [[] for _ in range(num_clients)]
    for c in range(classes):
        pool = rng.permutation(np.flatnonzero(val_labels == c))
        total = counts[:, c].sum()
        if total == 0 or len(pool) == 0:
            continue
        exact = counts[:, c] / total * len(pool)
        take = np.floor(exact).astype(np.int64)
        remainder = len(pool) - take.sum()
        order = np.lexsort((np.arange(num_clients), -(exact - take)))  # largest remainders, ties by id
        take[order[:remainder]] += 1
        start = 0
        for k in range(num_clients):
            shares[k].extend(int(i) for i in pool[start : start + take[k]])
            start += take[k]
    return [np.asarray(sorted(s), dtype=np.int64) for s in shares]


def accuracy_key(metric_names: Sequence[str]) -> str | None:
    """The task metric personalised evaluation reports: ``acc``, else the first ``*acc`` metric."""
    if "acc" in metric_names:
        return "acc"
    return next((m for m in metric_names if m.endswith("acc")), None)


def client_metric(pl_module: Any, examples: Sequence[dict], key: str, batch_size: int) -> float:
    """One task metric of the module's current model on a list of examples (eval mode, no RNG used)."""
    # a list is a map-style dataset (``__getitem__`` + ``__len__``); torch's annotations ask for the class
    dataset = cast("Dataset[dict]", list(examples))
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=pl_module.task.collate)
    return pl_module.evaluate(loader, generate=False)[f"val_{key}"]


def personal_metrics(
    pl_module: Any,
    val: Sequence[dict],
    shares: Sequence[np.ndarray],
    clients: Sequence[int],
    local_states: dict[int, State],
    initial_local: State,
    key: str,
    batch_size: int,
) -> dict[str, float]:
    """Mean, spread and minimum over ``clients`` of the metric with each client's local tensors loaded.

    The model's shared tensors must hold the global state; its local tensors are restored to
    ``initial_local`` afterwards (what the round loop leaves in the model between rounds).
    """
    peft, model = pl_module.peft, pl_module.model
    values = []
    try:
        for k in clients:
            if len(shares[k]) == 0:
                continue
            peft.set_state(model, local_states.get(k, initial_local))
            values.append(client_metric(pl_module, [val[i] for i in shares[k]], key, batch_size))
    finally:
        peft.set_state(model, initial_local)
    return summarise(values, key)


def summarise(values: Sequence[float], key: str) -> dict[str, float]:
    """The row's ``val_<key>_personal_mean/std/min`` and ``personal_clients`` over per-client values ({} if none)."""
    if not values:
        return {}
    arr = np.asarray(values, dtype=np.float64)
    return {
        f"val_{key}_personal_mean": float(arr.mean()),
        f"val_{key}_personal_std": float(arr.std()),
        f"val_{key}_personal_min": float(arr.min()),
        "personal_clients": float(len(values)),
    }
