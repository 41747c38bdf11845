"""Visual Prompt Tuning for timm Vision Transformers, without editing timm."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from fedlight.hookspecs import hookimpl
from fedlight.peft._vit import Bound as _Bound
from fedlight.peft._vit import vit_blocks
from fedlight.peft.base import HeadMode, PeftMethod, unfreeze


class VisualPrompts(nn.Module):
    """Learned prompt tokens, inserted before the first block and removed after the last.

    Prompts go right after the model's prefix tokens (class / register tokens), so timm's pooling
    (class token or average over patches) sees the same token layout as without prompts. With
    ``deep``, each block's prompt tokens are replaced by that block's own prompts (VPT-deep).
    """

    def __init__(self, depth: int, num_tokens: int, dim: int, num_prefix_tokens: int, patch_area: int, dropout: float):
        super().__init__()
        self.num_tokens, self.num_prefix_tokens = num_tokens, num_prefix_tokens
        self.prompts = nn.Parameter(torch.empty(depth, num_tokens, dim))
        bound = math.sqrt(6.0 / float(3 * patch_area + dim))  # VPT's xavier-uniform over the patch projection
        nn.init.uniform_(self.prompts, -bound, bound)
        self.dropout = nn.Dropout(dropout)
        self.last = 0

    def _tokens(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.prompts[index]).unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)

    def before_block(self, index: int, module: nn.Module, args: tuple) -> tuple:
        x, rest = args[0], args[1:]
        p, n = self.num_prefix_tokens, self.num_tokens
        if index == 0:
            x = torch.cat([x[:, :p], self._tokens(0, x), x[:, p:]], dim=1)
        else:
            x = torch.cat([x[:, :p], self._tokens(index, x), x[:, p + n :]], dim=1)
        return (x, *rest)

    def after_last(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        p, n = self.num_prefix_tokens, self.num_tokens
        return torch.cat([out[:, :p], out[:, p + n :]], dim=1)


class VPT(PeftMethod):
    """Visual Prompt Tuning (Jia et al. 2022, arXiv:2203.12119): learned prompt tokens in a frozen timm ViT.

    ``num_tokens`` prompts are inserted after the class/register tokens; ``deep`` gives every block
    its own prompts (VPT-deep), otherwise only the input gets them (VPT-shallow). The prompts live in
    ``model.vpt.prompts`` (trained and shared) and the head trains unless frozen.
    """

    name = "vpt"
    families: ClassVar[frozenset[str]] = frozenset({"timm"})
    example_args = {"num_tokens": 2, "deep": True}

    def __init__(
        self, num_tokens: int = 10, deep: bool = False, dropout: float = 0.0, head: HeadMode = "shared"
    ) -> None:
        super().__init__(head)
        if num_tokens < 1:
            raise ValueError(f"vpt num_tokens must be >= 1, got {num_tokens}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"vpt dropout must be in [0, 1), got {dropout}")
        self.num_tokens, self.deep, self.dropout = num_tokens, deep, dropout

    def prepare(self, model: nn.Module, head_modules: list[str]) -> nn.Module:
        blocks, dim, prefix = vit_blocks(model, self.name)
        if hasattr(model, "vpt"):
            raise ValueError("model already has a `vpt` module; VPT cannot be applied twice")
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", (16, 16))
        area = int(patch[0] * patch[1]) if isinstance(patch, (tuple, list)) else int(patch) ** 2
        prompts = VisualPrompts(len(blocks) if self.deep else 1, self.num_tokens, dim, prefix, area, self.dropout)
        model.add_module("vpt", prompts)
        for i, block in enumerate(blocks[: len(blocks) if self.deep else 1]):
            block.register_forward_pre_hook(_Bound(prompts, "before_block", i))
        blocks[-1].register_forward_hook(_Bound(prompts, "after_last"))
        if self.train_head:
            unfreeze(model, head_modules)
        return model


@hookimpl
def fedlight_peft_methods() -> list[type]:
    return [VPT]
