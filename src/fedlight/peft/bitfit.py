"""BitFit."""

from __future__ import annotations

from torch import nn

from fedlight.hookspecs import hookimpl
from fedlight.peft.base import PeftMethod, in_module, unfreeze


class BitFit(PeftMethod):
    """Bias-only tuning (Ben Zaken et al. 2022): every bias term trains, plus the head unless frozen."""

    name = "bitfit"

    def prepare(self, model: nn.Module, head_modules: list[str]) -> nn.Module:
        for pname, param in model.named_parameters():
            if pname.endswith("bias") and (self.train_head or not in_module(pname, head_modules)):
                param.requires_grad_(True)
        if self.train_head:
            unfreeze(model, head_modules)
        return model


@hookimpl
def fedlight_peft_methods() -> list[type]:
    return [BitFit]
