"""Shared helpers for fedlight's own timm-ViT methods (VPT, adapters)."""

from __future__ import annotations

from torch import nn


def vit_blocks(model: nn.Module, method: str) -> tuple[list[nn.Module], int, int]:
    """(blocks, embed_dim, num_prefix_tokens) of a timm ViT-like model, or a ValueError saying what is missing."""
    blocks = getattr(model, "blocks", None)
    dim = getattr(model, "embed_dim", None) or getattr(model, "num_features", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0 or not isinstance(dim, int):
        raise ValueError(
            f"PEFT method {method!r} needs a ViT-like timm model with `.blocks` of token blocks and `.embed_dim` "
            f"(e.g. vit_*, deit_*); {type(model).__name__} has none -- use lora, bitfit or ia3 instead"
        )
    return list(blocks), dim, int(getattr(model, "num_prefix_tokens", 0) or 0)


class Bound:
    """A hook calling a method of a module the model owns (a deepcopy of the model then hooks its own copy)."""

    def __init__(self, owner: nn.Module, method: str, *args: int) -> None:
        self.owner, self.method, self.args = owner, method, args

    def __call__(self, *hook_args):
        return getattr(self.owner, self.method)(*self.args, *hook_args)
