"""Bottleneck adapters for timm Vision Transformers: Houlsby / Pfeiffer (serial) and AdaptFormer (parallel)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from fedlight.hookspecs import hookimpl
from fedlight.peft._vit import Bound, vit_blocks
from fedlight.peft.base import HeadMode, PeftMethod, unfreeze


class Bottleneck(nn.Module):
    """down -> activation -> up, scaled; the up projection starts at zero so the block starts as the identity."""

    def __init__(self, dim: int, hidden: int, scale: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(hidden, dim)
        self.scale = scale
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x)))) * self.scale

    def serial(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        """Forward hook: the sub-layer's output plus the adapter of that output (Houlsby/Pfeiffer)."""
        return out + self(out)

    def parallel(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        """Forward hook: the sub-layer's output plus the adapter of its input (AdaptFormer)."""
        return out + self(args[0])


class _ViTAdapterMethod(PeftMethod):
    families: ClassVar[frozenset[str]] = frozenset({"timm"})

    def __init__(self, reduction: int, dropout: float, head: HeadMode) -> None:
        super().__init__(head)
        if reduction < 1:
            raise ValueError(f"{self.name} reduction must be >= 1, got {reduction}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{self.name} dropout must be in [0, 1), got {dropout}")
        self.reduction, self.dropout = reduction, dropout

    def sites(self) -> list[tuple[str, str]]:
        """(sub-layer attribute of a block, hook kind) pairs to adapt."""
        raise NotImplementedError

    scale: float = 1.0

    def prepare(self, model: nn.Module, head_modules: list[str]) -> nn.Module:
        blocks, dim, _ = vit_blocks(model, self.name)
        hidden = max(1, dim // self.reduction)
        for i, block in enumerate(blocks):
            for attr, kind in self.sites():
                sub = getattr(block, attr, None)
                if not isinstance(sub, nn.Module):
                    raise ValueError(
                        f"PEFT method {self.name!r}: block {i} ({type(block).__name__}) has no `{attr}` sub-layer"
                    )
                adapter = Bottleneck(dim, hidden, self.scale, self.dropout)
                block.add_module(f"adapter_{attr}", adapter)
                sub.register_forward_hook(Bound(adapter, kind))
        if self.train_head:
            unfreeze(model, head_modules)
        return model


class BottleneckAdapter(_ViTAdapterMethod):
    """Bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751; Pfeiffer et al. 2021) in every timm ViT block.

    ``placement: houlsby`` adds a serial adapter after the attention and after the MLP of every
    block; ``pfeiffer`` only after the MLP. Hidden width is ``embed_dim // reduction``; the up
    projection starts at zero, so the model starts as the base model.
    """

    name = "adapter"
    example_args = {"reduction": 8}

    def __init__(
        self,
        placement: Literal["houlsby", "pfeiffer"] = "houlsby",
        reduction: int = 16,
        dropout: float = 0.0,
        head: HeadMode = "shared",
    ) -> None:
        if placement not in ("houlsby", "pfeiffer"):
            raise ValueError(f"adapter placement must be 'houlsby' or 'pfeiffer', got {placement!r}")
        super().__init__(reduction, dropout, head)
        self.placement = placement

    def sites(self) -> list[tuple[str, str]]:
        return [("attn", "serial"), ("mlp", "serial")] if self.placement == "houlsby" else [("mlp", "serial")]


class AdaptFormer(_ViTAdapterMethod):
    """AdaptFormer (Chen et al. 2022, arXiv:2205.13535): a scaled bottleneck parallel to every timm ViT block's MLP.

    The adapter reads the MLP's (normalised) input and adds ``scale`` times its output to the MLP's;
    zero-initialised up projection, so the model starts as the base model.
    """

    name = "adaptformer"
    example_args = {"reduction": 8}

    def __init__(
        self, reduction: int = 12, scale: float = 0.1, dropout: float = 0.0, head: HeadMode = "shared"
    ) -> None:
        super().__init__(reduction, dropout, head)
        self.scale = scale

    def sites(self) -> list[tuple[str, str]]:
        return [("mlp", "parallel")]


@hookimpl
def fedlight_peft_methods() -> list[type]:
    return [BottleneckAdapter, AdaptFormer]
