"""LoRA through Hugging Face peft: one thin class over :class:`fedlight.peft.peft_library.PeftLibraryMethod`."""

from __future__ import annotations

from typing import Literal

from fedlight.hookspecs import hookimpl
from fedlight.peft.base import HeadMode
from fedlight.peft.peft_library import LINEAR, PeftLibraryMethod


class LoRA(PeftLibraryMethod):
    """Low-rank adapters (Hu et al. 2022, arXiv:2106.09685) via HF peft, on timm and transformers models alike.

    Only the adapter factors (and the head, unless frozen) train and travel; the base weights stay
    frozen on every client. ``target`` is a preset (``attention``, ``mlp``, ``attention+mlp``,
    ``all-linear``) or explicit module names. ``use_dora`` and ``use_rslora`` select DoRA and
    rank-stabilised scaling; ``init`` is passed to peft's ``init_lora_weights``.
    """

    name = "lora"
    example_args = {"r": 2, "alpha": 4}
    config_class = "LoraConfig"
    layer_types = (*LINEAR, "Conv2d", "Conv1d", "Conv3d", "Embedding")
    identity_at_init = True

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target: str | list[str] = "attention",
        use_dora: bool = False,
        use_rslora: bool = False,
        init: bool | Literal["gaussian", "pissa", "olora", "eva", "loftq"] = True,
        head: HeadMode = "shared",
    ) -> None:
        super().__init__(target, head)
        if r < 1:
            raise ValueError(f"lora r must be >= 1, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {dropout}")
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.use_dora, self.use_rslora, self.init = use_dora, use_rslora, init

    def config_kwargs(self, model, targets):
        return dict(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, use_dora=self.use_dora,
            use_rslora=self.use_rslora, init_lora_weights=self.init,
        )  # fmt: skip


@hookimpl
def fedlight_peft_methods() -> list[type]:
    return [LoRA]
