"""Personalised evaluation: each client's model (global shared + its local tensors) on its own held-out share."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from fedlight.core.engine import RoundEngine, RoundState
from fedlight.core.personal import accuracy_key, label_matched_split, personal_metrics, summarise
from fedlight.core.seeds import resolve_seed
from fedlight.core.state import State
from fedlight.features.base import RoundFeature


class PersonalEvaluation(RoundFeature):
    """Every N rounds (and after the last) logs ``val_acc_personal_mean/std/min`` over the clients that trained."""

    name = "personal_eval"
    reads_client_store = True  # each client's local tensors, on the server
    #: an engine whose clients keep their own state (Flower) asks each client of :meth:`clients_due` for
    #: :meth:`client_metrics` and hands the answers to :meth:`report` before the round's row
    client_evaluation: ClassVar[bool] = True

    def __init__(self, every: int) -> None:
        if every < 1:
            raise ValueError(f"federation.personal_eval_every must be >= 1 here, got {every}")
        self.every = every
        self._shares: list[np.ndarray] | None = None
        self._reported: dict[int, dict[str, float]] | None = None

    def attach(self, engine: RoundEngine) -> None:
        module = engine.module
        if accuracy_key(list(module.task.metrics(module.num_classes))) is None:
            raise ValueError(f"task {module.task.name!r} has no accuracy metric to personalise (personal_eval_every)")

    def _due(self, engine: RoundEngine, r: int) -> bool:
        return not r % self.every or r == engine.schedule.rounds

    def _key_and_shares(self, engine: RoundEngine) -> tuple[str, list[np.ndarray]]:
        dm, module = engine.data, engine.module
        if self._shares is None:
            val_labels = np.asarray([ex.get("label", 0) for ex in dm.splits.val], dtype=np.int64)
            self._shares = label_matched_split(
                dm.client_indices, dm.splits.train_labels(), val_labels, resolve_seed(dm.seed)
            )
        key = accuracy_key(list(module.task.metrics(module.num_classes)))
        assert key is not None, "attach() refuses a task without an accuracy metric"
        return key, self._shares

    def round_metrics(self, engine: RoundEngine, round: RoundState) -> dict[str, float]:
        if not self._due(engine, round.round):
            return {}
        if self._reported is not None:  # a remote engine's clients evaluated themselves (report())
            reported, self._reported = self._reported, None
            return self._summary(engine, [reported[c] for c in sorted(reported)])
        dm, module = engine.data, engine.module
        key, shares = self._key_and_shares(engine)
        locals_ = {c: s["local"] for c, s in engine.client_store.items() if "local" in s}
        return personal_metrics(
            module, dm.splits.val, shares, sorted(engine.client_store), locals_,
            engine.initial_local, key, dm.eval_batch_size,
        )  # fmt: skip

    # --- a remote engine's clients hold their own local tensors (Flower) ---------------------------

    def clients_due(self, engine: RoundEngine, round: RoundState) -> list[int]:
        """Server side, after ``end_round``: the clients to ask this round (those with client state), or []."""
        return sorted(engine.client_store) if self._due(engine, round.round) else []

    def client_metrics(self, engine: RoundEngine, client_id: int, local: State | None) -> dict[str, float]:
        """Client side: this client's value, with the model's shared tensors holding the new global state and
        ``local`` its own local tensors (None: it has none yet); {} when its held-out share is empty."""
        dm, module = engine.data, engine.module
        key, shares = self._key_and_shares(engine)
        one = personal_metrics(
            module, dm.splits.val, shares, [client_id], {client_id: local} if local else {},
            engine.initial_local, key, dm.eval_batch_size,
        )  # fmt: skip
        return {"value": one[f"val_{key}_personal_mean"]} if one else {}

    def report(self, values: dict[int, dict[str, float]]) -> None:
        """Server side: what each asked client's :meth:`client_metrics` returned; the next row summarises them."""
        self._reported = dict(values)

    def _summary(self, engine: RoundEngine, reported: list[dict[str, float]]) -> dict[str, float]:
        """The statistics ``personal_metrics`` computes, over the reported values in client order."""
        key, _ = self._key_and_shares(engine)
        return summarise([v["value"] for v in reported if "value" in v], key)
