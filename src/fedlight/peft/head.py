"""Head-only tuning (linear probe)."""

from __future__ import annotations

from torch import nn

from fedlight.hookspecs import hookimpl
from fedlight.peft.base import HeadMode, PeftMethod, unfreeze


class HeadOnly(PeftMethod):
    """Linear probe: only the task head trains; the whole backbone stays frozen."""

    name = "head"

    def __init__(self, head: HeadMode = "shared") -> None:
        if head == "frozen":
            raise ValueError("head-only tuning with head='frozen' would train nothing; use 'shared' or 'local'")
        super().__init__(head)

    def prepare(self, model: nn.Module, head_modules: list[str]) -> nn.Module:
        unfreeze(model, head_modules)
        return model


@hookimpl
def fedlight_peft_methods() -> list[type]:
    return [HeadOnly]
