"""What a quantized tensor really costs, and which tensors of a model are quantized.

torchao keeps int8 weights in a tensor subclass whose ``dtype`` reports the compute dtype (float32), so
``numel * element_size`` overstates it 4x; bitsandbytes packs 4-bit weights into uint8 parameters plus a
quantisation state. Both are counted here by the storage they actually hold.
"""

from __future__ import annotations

import torch


def is_quantized(t: torch.Tensor) -> bool:
    """A torchao tensor subclass (it flattens into inner tensors) or a bitsandbytes 4/8-bit parameter."""
    inner = getattr(t, "data", t)
    if type(inner) is not torch.Tensor and hasattr(inner, "__tensor_flatten__"):
        return True
    return type(t).__name__ in {"Params4bit", "Int8Params"}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: the sum over a subclass's inner tensors, plus a bitsandbytes quant state."""
    inner = getattr(t, "data", t)
    if type(inner) is not torch.Tensor and hasattr(inner, "__tensor_flatten__"):
        names, _ = inner.__tensor_flatten__()
        return sum(tensor_bytes(getattr(inner, n)) for n in names)
    total = t.numel() * t.element_size()
    state = getattr(t, "quant_state", None)  # bitsandbytes 4-bit: absmax (and nested state) per block
    for value in vars(state).values() if state is not None else ():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    return total


def quantized_names(model: torch.nn.Module) -> list[str]:
    """Names of the model's quantized parameters."""
    return [n for n, p in model.named_parameters() if is_quantized(p)]


def logical_numel(t: torch.Tensor) -> int:
    """Elements of the tensor the weight stands for (a packed bitsandbytes 4-bit weight holds two per byte)."""
    shape = getattr(getattr(t, "quant_state", None), "shape", None)
    if shape is not None:
        numel = 1
        for s in shape:
            numel *= int(s)
        return numel
    return t.numel()
