"""The PEFT-method plugin kind."""

from __future__ import annotations

from typing import ClassVar, Literal, cast

import torch
from torch import nn

from fedlight.core.plugin_base import Plugin
from fedlight.core.state import State

HeadMode = Literal["shared", "local", "frozen"]


def in_module(param_name: str, module_names: list[str]) -> bool:
    """Whether a parameter lives under one of the modules, even after a wrapper renamed its prefix."""
    dotted = "." + param_name
    return any(f".{m}." in dotted for m in module_names)


def unfreeze(model: nn.Module, module_names: list[str]) -> None:
    """Make every parameter under the named modules trainable."""
    for name, param in model.named_parameters():
        if in_module(name, module_names):
            param.requires_grad_(True)


def methods_for_family(family: str) -> list[str]:
    """Names of the registered PEFT methods that apply to a model family (for error messages)."""
    from fedlight.plugins import get_registry  # lazy: the registry imports this package

    try:
        table = get_registry().entries["peft_methods"]
    except Exception:  # never let a message helper hide the real error
        return []
    # Registry.add admits only subclasses of the kind's base class, PeftMethod here
    return sorted(n for n, e in table.items() if family in cast("type[PeftMethod]", e.cls).families)


class PeftMethod(Plugin):
    """Base class: make a model PEFT-ready and say which tensors travel.

    ``families`` lists the model families (``timm``, ``transformers``) a method applies to; asking for
    it on another family fails before training. ``head`` is the FedPEFT switch for the task head:
    ``shared`` trains it and sends it each round, ``local`` trains it but keeps it on each client
    (personalisation), ``frozen`` leaves it as built. Subclasses implement :meth:`prepare`, which
    receives a fully frozen model; everything else (naming, get/set of state) is written once here.
    """

    families: ClassVar[frozenset[str]] = frozenset({"timm", "transformers"})
    #: True when a method folds updates into the base weights (then "frozen" tensors may change)
    merges_into_base: ClassVar[bool] = False

    def __init__(self, head: HeadMode = "shared") -> None:
        if head not in ("shared", "local", "frozen"):
            raise ValueError(f"head must be 'shared', 'local' or 'frozen', got {head!r}")
        self.head = head

    @property
    def train_head(self) -> bool:
        return self.head != "frozen"

    def check_family(self, family: str) -> None:
        if family not in self.families:
            raise ValueError(
                f"PEFT method {self.name!r} does not apply to {family} models (it supports {sorted(self.families)}); "
                f"methods for {family} models: {', '.join(methods_for_family(family)) or 'see `fedlight plugins`'}"
            )

    def apply(self, model: nn.Module, family: str, head_modules: list[str]) -> nn.Module:
        """Freeze the model, let the method add/unfreeze its tensors, and return the model to train."""
        self.check_family(family)
        for param in model.parameters():
            param.requires_grad_(False)
        model = self.prepare(model, head_modules)
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"PEFT method {self.name!r} left nothing trainable on this model")
        self._head_modules = list(head_modules)
        return model

    def prepare(self, model: nn.Module, head_modules: list[str]) -> nn.Module:
        raise NotImplementedError

    # --- naming: derived from requires_grad, so it cannot drift from what actually trains -------

    def trainable_names(self, model: nn.Module) -> list[str]:
        return [n for n, p in model.named_parameters() if p.requires_grad]

    def local_names(self, model: nn.Module) -> list[str]:
        """Trainable tensors that never leave the client."""
        if self.head != "local":
            return []
        return [n for n in self.trainable_names(model) if in_module(n, self._head_modules)]

    def shared_names(self, model: nn.Module) -> list[str]:
        """Trainable tensors (and shared buffers) that travel each round."""
        local = set(self.local_names(model))
        return [n for n in self.trainable_names(model) if n not in local] + self.shared_buffers(model)

    def shared_buffers(self, model: nn.Module) -> list[str]:
        """Buffers that travel with the trainable tensors (e.g. BatchNorm statistics of trained layers)."""
        return []

    # --- state ---------------------------------------------------------------------------------

    @staticmethod
    def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
        return {**dict(model.named_buffers()), **dict(model.named_parameters())}

    @classmethod
    def get_state(cls, model: nn.Module, names: list[str]) -> State:
        tensors = cls.named_tensors(model)
        return {n: tensors[n].detach().clone() for n in names}

    @classmethod
    def set_state(cls, model: nn.Module, state: State) -> None:
        params = cls.named_tensors(model)
        with torch.no_grad():
            for name, value in state.items():
                try:
                    target = params[name]
                except KeyError:
                    raise KeyError(f"model has no trainable tensor {name!r}") from None
                if target.shape != value.shape:
                    raise ValueError(
                        f"tensor {name!r}: shape {tuple(value.shape)} does not match {tuple(target.shape)}"
                    )
                target.copy_(value.to(target.dtype))
