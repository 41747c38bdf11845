"""Federated LoRA variants that only change *what trains and travels* (FFA-LoRA, FedSA-LoRA), and the
LoRA layout that LoRA-aware aggregators (:mod:`fedlight.aggregators.lora_aware`) work on.

A :class:`LoraPair` names, for one adapted linear layer, the ``lora_A`` and ``lora_B`` tensors, the
frozen base weight they modify and the factor ``scaling`` (alpha/r, or alpha/sqrt(r) with rsLoRA), so
that the layer's effective weight is ``W0 + scaling · B @ A`` (transposed for GPT-2's ``Conv1D``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedlight.hookspecs import hookimpl
from fedlight.peft.lora import LoRA


@dataclass(frozen=True)
class LoraPair:
    """One adapted layer: state names of its factors and base weight, and how they combine."""

    a: str  # lora_A weight, shape (r, in)
    b: str  # lora_B weight, shape (out, r)
    base: str  # the frozen base weight, shape (out, in) (or (in, out) when fan_in_fan_out)
    scaling: float
    fan_in_fan_out: bool = False
    r: int = 0  # the layer's LoRA rank

    def to_base(self, product: torch.Tensor) -> torch.Tensor:
        """``scaling · M`` for a factor-space product M = B @ A, in the base weight's layout (fp64)."""
        d = product.double() * self.scaling
        return d.T if self.fan_in_fan_out else d

    def delta(self, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``scaling · B @ A`` in the base weight's layout (fp64)."""
        return self.to_base(b.double() @ a.double())


def lora_layout(model: nn.Module) -> list[LoraPair]:
    """The LoRA pairs of a model adapted by HF peft (adapter ``default``), in module order.

    Only plain linear LoRA layers (``nn.Linear`` and GPT-2's ``Conv1D``) have the ``W0 + s·BA`` form
    the aggregators rely on; DoRA, convolution and embedding LoRA layers are a ValueError.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import LoraLayer

    pairs: list[LoraPair] = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in getattr(module, "lora_A", {}):
            continue
        if not isinstance(module, LoraLinear):
            raise ValueError(
                f"LoRA-aware aggregation supports linear LoRA layers only; {name} is a {type(module).__name__} "
                "(change the lora `target` to linear layers)"
            )
        if module.use_dora.get("default", False):
            raise ValueError("LoRA-aware aggregation needs plain LoRA (W0 + s·BA); use_dora=true is not supported")
        pairs.append(
            LoraPair(
                a=f"{name}.lora_A.default.weight",
                b=f"{name}.lora_B.default.weight",
                base=f"{name}.base_layer.weight",
                scaling=float(module.scaling["default"]),
                fan_in_fan_out=bool(module.fan_in_fan_out),
                r=int(module.r["default"]),
            )
        )
    return pairs


def _is_lora(name: str, which: str) -> bool:
    return f".{which}.default." in f".{name}"


class FFALoRA(LoRA):
    """FFA-LoRA (Sun et al. 2024, arXiv:2403.12313): LoRA with A frozen at its seeded init; only B trains and travels.

    With every client sharing the same frozen A, averaging B is exact: mean_k(B_k)·A = mean_k(B_k·A).
    A is peft's (seeded) initialisation, rebuilt identically on every client and after a resume from
    ``seed_everything``; it never changes. Half the LoRA bytes travel. The paper suggests a larger
    ``alpha`` than plain LoRA, since only one factor adapts.
    """

    name = "ffa_lora"
    example_args = {"r": 2, "alpha": 4}

    def prepare(self, model: nn.Module, head_modules: list[str]) -> nn.Module:
        if self.init is not True and self.init != "gaussian":
            raise ValueError(f"ffa_lora needs a random A: init must be true or 'gaussian', got {self.init!r}")
        model = super().prepare(model, head_modules)
        for pname, param in model.named_parameters():
            if _is_lora(pname, "lora_A"):
                param.requires_grad_(False)
        return model


class FedSALoRA(LoRA):
    """FedSA-LoRA (Guo et al. 2024, arXiv:2410.01463): LoRA whose A matrices are shared and averaged, B stays on each client.

    A learns general knowledge and is aggregated; B captures client-specific knowledge and is a
    *local* tensor: it never leaves the client and persists across rounds in the client-state store
    (a client's first round starts from B = 0). The global model's B is its initial value (zero), so
    global-model accuracy alone understates this personalised method.
    """

    name = "fedsa_lora"
    example_args = {"r": 2, "alpha": 4}

    def local_names(self, model: nn.Module) -> list[str]:
        local = set(super().local_names(model))
        return [n for n in self.trainable_names(model) if n in local or _is_lora(n, "lora_B")]


@hookimpl
def fedlight_peft_methods() -> list[type]:
    return [FFALoRA, FedSALoRA]
