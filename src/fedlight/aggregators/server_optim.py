"""Server optimizers on the pseudo-gradient (Reddi et al. 2021, "Adaptive Federated Optimization").

Each round the server forms the pseudo-gradient ``Δ = Σ_k w_k Δ_k`` (the weighted mean of the client
deltas, exactly FedAvg's mean) and, instead of applying it as is, feeds it to an optimizer:
``new = global + server_lr * update(Δ)``. With ``server_lr = 1`` and no history the plain rule is FedAvg.

* :class:`FedAvgM` — server momentum (Hsu et al. 2019): ``m = μ m + Δ``; ``update = m``.
* :class:`FedAdagrad`, :class:`FedAdam`, :class:`FedYogi` — Algorithm 2 of Reddi et al.:
  ``m = β1 m + (1 − β1) Δ``, a per-coordinate second moment ``v`` (initialised to ``τ²``), and
  ``update = m / (√v + τ)``; no bias correction, as in the paper.

Moments are kept per tensor name (fp32) and, with the step count, returned by ``state_dict()`` so a
resumed run continues exactly. Client sampling and the round loop stay outside (DESIGN §7).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedlight.aggregators.base import Aggregator, check_weighting, weighted_mean_delta
from fedlight.core.state import State, add, check_same_keys
from fedlight.core.update import DecodedUpdate
from fedlight.hookspecs import hookimpl


class ServerOptimizer(Aggregator):
    """Base of the server optimizers: ``global + server_lr * update(pseudo-gradient)`` (not registered itself).

    Subclasses implement :meth:`direction`, which reads and advances the per-tensor state in
    ``self.moments`` (``{moment name: {tensor name: tensor}}``).
    """

    moment_names: tuple[str, ...] = ()
    sum_based = True  # the pseudo-gradient is the mean delta: runs on a secure sum

    def __init__(self, server_lr: float, weighting: str) -> None:
        if not server_lr > 0:
            raise ValueError(f"{self.name} server_lr must be > 0, got {server_lr}")
        self.server_lr = float(server_lr)
        self.weighting = check_weighting(weighting, self.name)
        self.step_count = 0
        self.moments: dict[str, State] = {}

    # -- the maths ---------------------------------------------------------------------------
    def pseudo_gradient(self, updates: Sequence[DecodedUpdate]) -> State:
        return weighted_mean_delta(updates, self.weighting, self.name)

    def direction(self, delta: State) -> State:
        raise NotImplementedError

    def aggregate(self, global_state: State, updates: list[DecodedUpdate]) -> State:
        delta = self.pseudo_gradient(updates)
        check_same_keys(global_state, delta, f"{self.name} pseudo-gradient")
        for moment in self.moments.values():
            check_same_keys(delta, moment, f"{self.name} optimizer state (the trainable tensors changed?)")
        direction = self.direction(delta)
        self.step_count += 1
        return add(global_state, {k: self.server_lr * v for k, v in direction.items()})

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step_count}
        for moment in self.moment_names:
            out[moment] = {k: v.detach().clone() for k, v in self.moments.get(moment, {}).items()}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"step", *self.moment_names}
        if set(state) != expected:
            raise ValueError(f"{self.name} state must have keys {sorted(expected)}, got {sorted(state)}")
        self.step_count = int(state["step"])
        self.moments = {}
        for moment in self.moment_names:
            tensors = {k: torch.as_tensor(v).detach().clone().float() for k, v in state[moment].items()}
            if tensors:
                self.moments[moment] = tensors


def _check_beta(value: float, field: str, who: str) -> float:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{who} {field} must be in [0, 1), got {value}")
    return float(value)


class FedAvgM(ServerOptimizer):
    """FedAvg with server momentum (Hsu et al. 2019; Reddi et al. 2021): m = μ·m + Δ, global += server_lr·m.

    The first step applies exactly ``server_lr * Δ``; ``momentum = 0`` with ``server_lr = 1`` is FedAvg.
    """

    name = "fedavgm"
    example_args = {"server_lr": 1.0, "momentum": 0.9}
    moment_names = ("momentum_buffer",)

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9, weighting: str = "examples") -> None:
        super().__init__(server_lr, weighting)
        self.momentum = _check_beta(momentum, "momentum", self.name)

    def direction(self, delta: State) -> State:
        previous = self.moments.get("momentum_buffer")
        buf = {k: v.clone() if previous is None else self.momentum * previous[k] + v for k, v in delta.items()}
        self.moments["momentum_buffer"] = buf
        return buf


class _Adaptive(ServerOptimizer):
    """Shared Algorithm 2 of Reddi et al. 2021; subclasses differ only in the second-moment update."""

    moment_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, server_lr: float, beta1: float, beta2: float, tau: float, weighting: str) -> None:
        super().__init__(server_lr, weighting)
        self.beta1, self.beta2 = beta1, beta2  # validated by the subclass, which knows the field names
        if not tau > 0:
            raise ValueError(f"{self.name} tau must be > 0, got {tau}")
        self.tau = float(tau)

    def second_moment(self, v: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def direction(self, delta: State) -> State:
        m_prev = self.moments.get("exp_avg") or {k: torch.zeros_like(v) for k, v in delta.items()}
        v_prev = self.moments.get("exp_avg_sq") or {k: torch.full_like(v, self.tau**2) for k, v in delta.items()}
        m = {k: self.beta1 * m_prev[k] + (1.0 - self.beta1) * d for k, d in delta.items()}
        v = {k: self.second_moment(v_prev[k], d * d) for k, d in delta.items()}
        self.moments = {"exp_avg": m, "exp_avg_sq": v}
        return {k: m[k] / (v[k].sqrt() + self.tau) for k in delta}


def _betas(betas: Sequence[float], who: str) -> tuple[float, float]:
    if len(betas) != 2:
        raise ValueError(f"{who} betas must be two numbers (beta1, beta2), got {betas!r}")
    return _check_beta(betas[0], "betas[0]", who), _check_beta(betas[1], "betas[1]", who)


class FedAdagrad(_Adaptive):
    """FedAdagrad (Reddi et al. 2021): v += Δ², global += server_lr·m/(√v + τ); v starts at τ².

    ``beta1`` is the first-moment decay (0 disables momentum).
    """

    name = "fedadagrad"
    example_args = {"server_lr": 0.1, "beta1": 0.9, "tau": 1e-2}

    def __init__(
        self, server_lr: float = 0.1, beta1: float = 0.9, tau: float = 1e-3, weighting: str = "examples"
    ) -> None:
        super().__init__(server_lr, _check_beta(beta1, "beta1", "fedadagrad"), 0.0, tau, weighting)

    def second_moment(self, v: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        return v + sq


class FedAdam(_Adaptive):
    """FedAdam (Reddi et al. 2021): Adam on the pseudo-gradient, v = β2·v + (1−β2)Δ², no bias correction.

    Reddi et al. tune ``server_lr`` per task (often 1e-2 .. 1) with ``tau`` around 1e-3; ``tau`` bounds
    how large a step a coordinate with a tiny second moment can take.
    """

    name = "fedadam"
    example_args = {"server_lr": 0.1, "betas": (0.9, 0.99), "tau": 1e-2}

    def __init__(
        self,
        server_lr: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.99),
        tau: float = 1e-3,
        weighting: str = "examples",
    ) -> None:
        super().__init__(server_lr, *_betas(betas, "fedadam"), tau, weighting)

    def second_moment(self, v: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1.0 - self.beta2) * sq


class FedYogi(_Adaptive):
    """FedYogi (Reddi et al. 2021): Adam with v −= (1−β2)·Δ²·sign(v − Δ²), a more cautious v."""

    name = "fedyogi"
    example_args = {"server_lr": 0.1, "betas": (0.9, 0.99), "tau": 1e-2}

    def __init__(
        self,
        server_lr: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.99),
        tau: float = 1e-3,
        weighting: str = "examples",
    ) -> None:
        super().__init__(server_lr, *_betas(betas, "fedyogi"), tau, weighting)

    def second_moment(self, v: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        return v - (1.0 - self.beta2) * sq * torch.sign(v - sq)


@hookimpl
def fedlight_aggregators() -> list[type]:
    return [FedAvgM, FedAdagrad, FedAdam, FedYogi]
