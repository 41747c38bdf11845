"""Full fine-tuning."""

from __future__ import annotations

from torch import nn

from fedlight.hookspecs import hookimpl
from fedlight.peft.base import PeftMethod, in_module


class FullFineTuning(PeftMethod):
    """Every parameter trains and travels: the full-model FedAvg baseline PEFT is compared against."""

    name = "full"

    def prepare(self, model: nn.Module, head_modules: list[str]) -> nn.Module:
        for pname, param in model.named_parameters():
            param.requires_grad_(self.train_head or not in_module(pname, head_modules))
        return model


@hookimpl
def fedlight_peft_methods() -> list[type]:
    return [FullFineTuning]
