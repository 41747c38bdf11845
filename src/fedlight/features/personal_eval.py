"""Personalised evaluation: each client's model (global shared + its local tensors) on its own held-out share."""

from __future__ import annotations

import numpy as np

from fedlight.core.engine import RoundEngine, RoundState
from fedlight.core.personal import accuracy_key, label_matched_split, personal_metrics
from fedlight.core.seeds import resolve_seed
from fedlight.features.base import RoundFeature


class PersonalEvaluation(RoundFeature):
    """Every N rounds (and after the last) logs ``val_acc_personal_mean/std/min`` over the clients that trained."""

    name = "personal_eval"
    reads_client_store = True  # each client's local tensors, on the server

    def __init__(self, every: int) -> None:
        if every < 1:
            raise ValueError(f"federation.personal_eval_every must be >= 1 here, got {every}")
        self.every = every
        self._shares: list[np.ndarray] | None = None

    def attach(self, engine: RoundEngine) -> None:
        module = engine.module
        if accuracy_key(list(module.task.metrics(module.num_classes))) is None:
            raise ValueError(f"task {module.task.name!r} has no accuracy metric to personalise (personal_eval_every)")

    def round_metrics(self, engine: RoundEngine, round: RoundState) -> dict[str, float]:
        r = round.round
        if r % self.every and r != engine.schedule.rounds:
            return {}
        dm, module = engine.data, engine.module
        if self._shares is None:
            val_labels = np.asarray([ex.get("label", 0) for ex in dm.splits.val], dtype=np.int64)
            self._shares = label_matched_split(
                dm.client_indices, dm.splits.train_labels(), val_labels, resolve_seed(dm.seed)
            )
        key = accuracy_key(list(module.task.metrics(module.num_classes)))
        assert key is not None, "attach() refuses a task without an accuracy metric"
        locals_ = {c: s["local"] for c, s in engine.client_store.items() if "local" in s}
        return personal_metrics(
            module, dm.splits.val, self._shares, sorted(engine.client_store), locals_,
            engine.initial_local, key, dm.eval_batch_size,
        )  # fmt: skip
