"""Target-module presets so a config can say ``target: attention`` instead of module names.

Presets are suffixes per architecture family (timm ViT, BERT-like, GPT-2-like, Llama-like); they
resolve to the full names of the linear layers that exist in the given model, outside the head.
"""

from __future__ import annotations

from torch import nn

_ATTENTION = (
    "attn.qkv", "attn.proj",  # timm ViT
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",  # BERT
    "attn.c_attn", "attn.c_proj",  # GPT-2
    "q_proj", "k_proj", "v_proj", "o_proj",  # Llama
)  # fmt: skip
_MLP = (
    "mlp.fc1", "mlp.fc2",  # timm ViT
    "intermediate.dense", "output.dense",  # BERT (attention.output.dense is excluded below)
    "mlp.c_fc", "mlp.c_proj",  # GPT-2
    "gate_proj", "up_proj", "down_proj",  # Llama
)  # fmt: skip

PRESETS: dict[str, tuple[str, ...]] = {"attention": _ATTENTION, "mlp": _MLP, "attention+mlp": _ATTENTION + _MLP}


def _is_linear(module: nn.Module) -> bool:
    # transformers' GPT-2 uses a Conv1D that is a linear layer with transposed weight
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _matches(name: str, suffixes: tuple[str, ...], preset: str) -> bool:
    if preset == "mlp" and name.endswith("attention.output.dense"):
        return False
    return any(name == s or name.endswith("." + s) for s in suffixes)


def resolve_targets(model: nn.Module, target: str | list[str], head_modules: list[str]) -> list[str]:
    """Full module names for a preset (``attention``, ``mlp``, ``attention+mlp``, ``all-linear``).

    An explicit list of module names is returned unchanged (peft matches it by suffix).
    """
    if isinstance(target, (list, tuple)):
        if not target:
            raise ValueError("target module list is empty")
        return list(target)
    head = tuple(head_modules)
    names = [
        n
        for n, m in model.named_modules()
        if n and _is_linear(m) and not any(n == h or n.startswith(h + ".") for h in head)
    ]
    if target == "all-linear":
        chosen = names
    elif target in PRESETS:
        chosen = [n for n in names if _matches(n, PRESETS[target], target)]
    else:
        raise ValueError(
            f"unknown target preset {target!r}; use one of {sorted([*PRESETS, 'all-linear'])} or a list of module names"
        )
    if not chosen:
        raise ValueError(
            f"target preset {target!r} matches no linear layer in this model; "
            f"give module names explicitly, e.g. some of {names[:8]}"
        )
    return chosen
