"""Named-tensor state: the one currency between model, client, codec and server.

A ``State`` is an ordered ``dict[str, Tensor]``. Every function here returns new tensors and never
aliases its inputs, so a global state cannot be mutated by a client by accident.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

State = dict[str, torch.Tensor]


def clone_state(state: Mapping[str, torch.Tensor]) -> State:
    return {k: v.detach().clone() for k, v in state.items()}


def check_same_keys(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], what: str = "state") -> None:
    if list(a) != list(b):
        missing = sorted(set(a) - set(b))
        extra = sorted(set(b) - set(a))
        raise ValueError(f"{what} tensor names differ: missing {missing[:5]}, unexpected {extra[:5]}")


def subtract(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> State:
    """``a - b`` per tensor, computed in fp32 so low-precision params do not lose the update."""
    check_same_keys(a, b)
    return {k: a[k].detach().float() - b[k].detach().float() for k in a}


def add(a: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> State:
    """``a + delta`` per tensor, cast back to ``a``'s dtype."""
    check_same_keys(a, delta)
    return {k: (a[k].detach().float() + delta[k].float()).to(a[k].dtype) for k in a}


def weighted_sum(states: Iterable[Mapping[str, torch.Tensor]], weights: Iterable[float]) -> State:
    """``sum_k w_k * s_k`` in fp64 accumulation, returned as fp32 (weights are not normalised)."""
    out: State = {}
    for state, w in zip(states, weights, strict=True):
        for k, v in state.items():
            acc = out.get(k)
            term = v.detach().double() * float(w)
            out[k] = term if acc is None else acc + term
    return {k: v.float() for k, v in out.items()}


def global_norm(state: Mapping[str, torch.Tensor]) -> float:
    """L2 norm over all tensors, accumulated in fp64 so huge or fp16 tensors cannot overflow."""
    total = torch.zeros((), dtype=torch.float64)
    for v in state.values():
        total += v.detach().double().pow(2).sum()
    return float(total.sqrt())


def num_elements(state: Mapping[str, torch.Tensor]) -> int:
    return sum(v.numel() for v in state.values())


def raw_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """In-memory size of the tensors (not what travels: that is the codec's payload length)."""
    return sum(v.numel() * v.element_size() for v in state.values())


def is_finite(state: Mapping[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
