"""Data poisoning by label flipping."""

from __future__ import annotations

from typing import Any

from fedlight.attacks.base import Attack
from fedlight.hookspecs import hookimpl


class LabelFlip(Attack):
    """Label flipping (Biggio et al. 2012; Tolpegin et al. 2020): malicious clients train on label C-1-y."""

    name = "label_flip"
    colludes = False  # it only changes the attacker's own batches

    def poison_batch(self, batch: dict[str, Any], num_classes: int) -> dict[str, Any]:
        if "labels" in batch and num_classes > 1 and not batch["labels"].is_floating_point():
            batch["labels"] = (num_classes - 1) - batch["labels"]
        return batch


@hookimpl
def fedlight_attacks() -> list[type]:
    return [LabelFlip]
