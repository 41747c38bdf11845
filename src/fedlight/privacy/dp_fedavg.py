"""Central user-level DP-FedAvg with fixed or adaptive clipping.

Assumptions (checked by config validation, not here):

* The aggregator is FedAvg-like with *uniform* weights: the new global state is
  ``old + mean(clipped deltas)``. ``post_aggregate`` recovers that mean as ``new - old`` and adds
  Gaussian noise of std ``sigma * C / n`` to it, i.e. ``sigma * C`` on the sum. With example
  weighting or a server optimiser the sensitivity of ``new - old`` is not ``C / n`` and the stated
  epsilon would be wrong.
* NaN/Inf updates never reach this plugin: the server pipeline's validation rejects them first.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from fedlight.core.state import State, subtract
from fedlight.core.update import DecodedUpdate
from fedlight.hookspecs import hookimpl
from fedlight.privacy.accounting import Accountant, check_mechanism_args, make_record, noise_for_epsilon
from fedlight.privacy.base import Privacy, RunSpec


def state_norm(state: dict[str, torch.Tensor]) -> float:
    """Global L2 norm over all tensors, accumulated in fp64 (no fp16/bf16 overflow; 0-d tensors fine).

    Values are divided by the largest magnitude first, so even fp64 values near 1e300 do not overflow.
    """
    values = [v.detach().to(device="cpu", dtype=torch.float64) for v in state.values()]
    scale = max((float(v.abs().max()) for v in values if v.numel()), default=0.0)
    if scale == 0.0 or not math.isfinite(scale):
        return scale
    total = torch.zeros((), dtype=torch.float64)
    for v in values:
        total += (v / scale).pow(2).sum()
    return scale * math.sqrt(float(total))


def clip_state(state: dict[str, torch.Tensor], clip_norm: float) -> tuple[State, float]:
    """Scale ``state`` so its global L2 norm is at most ``clip_norm``; returns (clipped, original norm).

    Each tensor keeps its dtype. The scale is applied in fp64; if rounding back to a low-precision
    dtype pushes the norm over the bound, the factor is shrunk until it does not, so the bound holds
    exactly as measured in fp64. An all-zero state is returned unchanged (no 0/0).
    """
    norm = state_norm(state)
    if norm <= clip_norm:
        return {k: v.detach().clone() for k, v in state.items()}, norm
    factor = clip_norm / norm
    # shrink by a few units of the coarsest dtype's rounding (bf16: 2^-7; fp32: 2^-23), not more
    step = max((torch.finfo(v.dtype).eps for v in state.values() if v.is_floating_point()), default=2**-7)
    for _ in range(64):
        out = {k: (v.detach().double() * factor).to(v.dtype) for k, v in state.items()}
        if state_norm(out) <= clip_norm:
            return out, norm
        factor *= 1 - 2 * step
    raise RuntimeError("could not clip the update below the bound")  # unreachable for finite input


def gaussian_like(state: dict[str, torch.Tensor], std: float, generator: torch.Generator) -> State:
    """Independent N(0, std^2) noise for every element, drawn in fp32 from ``generator`` (CPU)."""
    return {
        k: (torch.randn(v.shape, generator=generator, dtype=torch.float32) * std).to(v.device) for k, v in state.items()
    }


class DPFedAvg(Privacy):
    """Central user-level DP-FedAvg with fixed or adaptive clipping (McMahan et al. 2018; Andrew et al. 2021).

    Each decoded client delta is clipped to global L2 norm ``clip_norm`` (C) and Gaussian noise of
    std ``sigma_eff * C`` is added to the sum of the clipped deltas (the uniform FedAvg aggregator's
    mean is turned back into that sum in ``post_aggregate``).

    ``sampling: fixed``: the round plan draws exactly ``clients_per_round`` (m) of ``population``
    (N) clients uniformly without replacement; the new state is ``old + (sum + noise) / n`` with n
    the accepted updates. Accounted per round as ``SampledWithoutReplacementDpEvent(N, m)`` under
    replace-one adjacency: one user moves the clipped sum by up to 2C, so the multiplier is sigma/2.

    ``sampling: poisson`` (McMahan et al. 2018): the round plan includes every client independently
    with probability q = m / N (``cohort_sampling``), so the cohort is Binomial(N, q), possibly
    empty; the new state uses the fixed-denominator estimator ``old + (sum + noise) / (q N)``, whose
    sensitivity does not depend on the realised cohort, and an empty cohort still releases
    ``old + noise / (q N)``. Accounted as ``PoissonSampledDpEvent(q, Gaussian(sigma))`` under
    add-or-remove-one adjacency (sensitivity C).

    Adaptive clipping (Andrew et al. 2021; TF Privacy ``QuantileEstimatorQuery``): every client
    reports ``b_i - 1/2`` with ``b_i = [norm_i <= C]`` (centred: sensitivity 1/2 under add/remove);
    the server adds N(0, sigma_b^2) to the sum, divides by the same denominator as the update (q N,
    or n with ``fixed``), adds 1/2 back and clamps to [0, 1]: that is b~, and
    ``C <- C * exp(-lr * (b~ - gamma))``. The count is a second Gaussian release on the same cohort:
    multipliers ``sigma_eff`` (sum, sensitivity C) and ``2 sigma_b`` (count, sensitivity 1/2)
    together are one Gaussian mechanism with ``sigma = (sigma_eff^-2 + (2 sigma_b)^-2)^-1/2``
    (the paper's §3.1), so the updates get ``sigma_eff = (sigma^-2 - (2 sigma_b)^-2)^-1/2 > sigma``
    and the accountant composes ``noise_multiplier`` = sigma. Under replace-one (``fixed``) both
    sensitivities double and the same relation holds for the halved multipliers.

    Refused before training (``bind_run``): ``federation.client_sampling: weighted`` (the accounting
    assumes every client is included at rate m / N, weighted sampling includes large clients more
    often); with ``poisson``, ``faults.min_clients > 1`` (every round must be released) and
    secure aggregation (a Poisson cohort can have fewer than two clients).

    Args:
        noise_multiplier: sigma, the overall noise multiplier that is accounted; null (with
            ``target_epsilon``) picks the smallest sigma for which ``federation.rounds`` rounds fit the
            budget (dp-accounting's calibration, via ``accounting.noise_for_epsilon``).
        clip_norm: C (the initial C with adaptive clipping).
        delta: the delta at which ``epsilon()`` is reported.
        population: number of clients that can be sampled (for sampling rate / accounting);
            null takes ``data.num_clients`` from the run (a different explicit value is an error).
        clients_per_round: clients sampled per round (expected number with ``poisson``); null takes
            ``federation.clients_per_round``.
        sampling: ``fixed`` (exactly ``clients_per_round`` clients per round) or ``poisson`` (each
            client independently at rate clients_per_round / population; the round plan then draws
            Poisson cohorts).
        accountant: ``rdp`` or ``pld`` (``pld`` supports ``poisson`` only).
        target_epsilon: optional budget; ``would_exceed()`` tells the round loop to stop before it.
        adaptive_clipping: adapt C towards ``target_quantile`` of the update norms.
        target_quantile: gamma, the target fraction of unclipped updates.
        clip_learning_rate: eta of the geometric update.
        clipped_count_stddev: sigma_b, std of the noise on the unclipped count (None: 0.05 * clients_per_round).
    """

    name = "dp_fedavg"
    requires_uniform_mean = True
    example_args = {"noise_multiplier": 1.0, "clip_norm": 1.0, "population": 20, "clients_per_round": 4}

    def __init__(
        self,
        noise_multiplier: float | None = 1.0,
        clip_norm: float = 1.0,
        delta: float = 1e-5,
        population: int | None = None,
        clients_per_round: int | None = None,
        sampling: Literal["fixed", "poisson"] = "fixed",
        accountant: Literal["rdp", "pld"] = "rdp",
        target_epsilon: float | None = None,
        adaptive_clipping: bool = False,
        target_quantile: float = 0.5,
        clip_learning_rate: float = 0.2,
        clipped_count_stddev: float | None = None,
    ) -> None:
        check_mechanism_args(
            "dp_fedavg",
            noise_multiplier=noise_multiplier,
            delta=delta,
            bounds={"clip_norm": clip_norm},
            target_epsilon=target_epsilon,
            sampling=sampling,
            accountant=accountant,
        )
        if sampling == "fixed" and accountant == "pld":
            raise ValueError("dp_fedavg accountant 'pld' does not support sampling 'fixed'; use accountant: rdp")
        if not 0 < target_quantile < 1:
            raise ValueError(f"dp_fedavg target_quantile must be in (0, 1), got {target_quantile}")
        if not clip_learning_rate > 0:
            raise ValueError(f"dp_fedavg clip_learning_rate must be > 0, got {clip_learning_rate}")
        self.noise_multiplier = None if noise_multiplier is None else float(noise_multiplier)
        self.clip_norm = float(clip_norm)
        self.delta = float(delta)
        self.population = population
        self.clients_per_round = clients_per_round
        self.sampling = sampling
        self.target_epsilon = target_epsilon
        self.adaptive_clipping = adaptive_clipping
        self.target_quantile = float(target_quantile)
        self.clip_learning_rate = float(clip_learning_rate)
        self._clipped_count_stddev = clipped_count_stddev
        self.clipped_count_stddev = 0.0
        if clipped_count_stddev is not None:
            self._set_count_noise(clipped_count_stddev)
        self.accountant = Accountant(accountant)
        self.rounds = 0
        self._pending_count: tuple[float, int] | None = None  # (unclipped count, n) of this round
        if population is not None and clients_per_round is not None:
            self.bind(population, clients_per_round)

    def bind(self, population: int, clients_per_round: int) -> None:
        """Take the run's sampling (called by the round loop before round 1) and validate against it."""
        for field, given, actual in (
            ("population", self.population, population),
            ("clients_per_round", self.clients_per_round, clients_per_round),
        ):
            if given is not None and given != actual:
                raise ValueError(
                    f"dp_fedavg {field}={given} disagrees with the run ({actual}); leave it null to use the run's value"
                )
        if population < 1:
            raise ValueError(f"dp_fedavg population must be >= 1, got {population}")
        if not 1 <= clients_per_round <= population:
            raise ValueError(
                f"dp_fedavg clients_per_round must be in [1, population={population}], got {clients_per_round}"
            )
        self.population, self.clients_per_round = int(population), int(clients_per_round)
        sigma_b = self._clipped_count_stddev
        self._set_count_noise(0.05 * clients_per_round if sigma_b is None else sigma_b)

    @property
    def cohort_sampling(self) -> str:
        """``poisson``: the round plan must draw Poisson cohorts (see the class docstring)."""
        return self.sampling

    def bind_run(self, spec: RunSpec) -> None:
        """Bind the sampling; with ``noise_multiplier: null`` pick sigma so ``spec.rounds`` rounds fit ``target_epsilon``."""
        if spec.client_sampling != "uniform":
            raise ValueError(
                f"dp_fedavg accounts for every client being sampled at the same rate (clients_per_round / population); "
                f"federation.client_sampling: {spec.client_sampling} samples some clients more often, so the reported "
                "epsilon would be too low: set federation.client_sampling: uniform"
            )
        if self.sampling == "poisson" and spec.min_clients > 1:
            raise ValueError(
                f"dp_fedavg sampling: poisson releases every round (an empty cohort adds noise only); skipping rounds "
                f"with fewer than faults.min_clients={spec.min_clients} accepted updates would depend on the data: "
                "set federation.faults.min_clients: 1"
            )
        self.bind(spec.population, spec.clients_per_round)
        if self.noise_multiplier is None:
            assert self.target_epsilon is not None, "check_mechanism_args: noise_multiplier null needs target_epsilon"
            population, per_round = self._sampling()
            fixed = self.sampling == "fixed"
            sigma = noise_for_epsilon(
                self.target_epsilon, self.delta, per_round / population, spec.rounds,
                self.sampling, population if fixed else None, per_round if fixed else None,
                self.accountant.method,
            )  # fmt: skip
            self.noise_multiplier = 2 * sigma if fixed else sigma  # fixed: the event's multiplier is sigma / 2
            self._set_count_noise(self.clipped_count_stddev)

    def _set_count_noise(self, sigma_b: float) -> None:
        self.clipped_count_stddev = float(sigma_b)
        if self.clipped_count_stddev < 0:
            raise ValueError(f"dp_fedavg clipped_count_stddev must be >= 0, got {self.clipped_count_stddev}")
        if self.noise_multiplier is None:  # checked once bind_run has picked sigma
            return
        if self.adaptive_clipping and 2 * self.clipped_count_stddev <= self.noise_multiplier:
            raise ValueError(
                f"dp_fedavg clipped_count_stddev ({self.clipped_count_stddev}) must exceed noise_multiplier / 2 "
                f"({self.noise_multiplier / 2}) with adaptive clipping, or the count alone spends the whole budget"
            )

    def _sampling(self) -> tuple[int, int]:
        """(population, clients_per_round), both known once :meth:`bind` ran."""
        assert self.population is not None and self.clients_per_round is not None, "bind() runs before round 1"
        return self.population, self.clients_per_round

    def _sigma(self) -> float:
        """The noise multiplier, given or picked by :meth:`bind_run` before round 1."""
        assert self.noise_multiplier is not None, "bind_run() picks noise_multiplier from target_epsilon"
        return self.noise_multiplier

    # --- mechanism -----------------------------------------------------------------------------------

    @property
    def update_noise_multiplier(self) -> float:
        """sigma_eff applied to the updates (= sigma without adaptive clipping)."""
        if not self.adaptive_clipping or self.clipped_count_stddev == 0:
            return self._sigma()
        return (self._sigma() ** -2 - (2 * self.clipped_count_stddev) ** -2) ** -0.5

    def server_transform(self, updates: list[DecodedUpdate], generator: torch.Generator) -> list[DecodedUpdate]:
        out, unclipped = [], 0
        for u in updates:
            clipped, norm = clip_state(u.delta, self.clip_norm)
            unclipped += norm <= self.clip_norm
            out.append(DecodedUpdate(u.client_id, u.num_examples, clipped))
        self._pending_count = (float(unclipped), len(updates))
        return out

    def denominator(self, num_updates: int) -> float:
        """What the noised sum is divided by: q N = clients_per_round (``poisson``), else the accepted count."""
        return float(self._sampling()[1]) if self.sampling == "poisson" else float(num_updates)

    def secure_clip_norm(self) -> float:
        """Under secure aggregation each client clips its own delta to C (the server cannot)."""
        return self.clip_norm

    def secure_aggregation_problem(self) -> str | None:
        if self.sampling == "poisson":
            return (
                "sampling: poisson draws cohorts of random size (possibly 0 or 1 client), which the secure-sum "
                "protocol cannot mask; use sampling: fixed with secure aggregation"
            )
        if self.adaptive_clipping:
            return (
                "adaptive_clipping counts unclipped updates on the server, which never sees them under secure "
                "aggregation; use fixed clipping (adaptive_clipping: false)"
            )
        return None

    def post_aggregate(
        self, old_global: State, new_global: State, num_updates: int, generator: torch.Generator
    ) -> State:
        if num_updates < 1 and self.sampling != "poisson":
            return new_global  # fixed: nothing arrived, nothing is released
        denominator = self.denominator(num_updates)
        std = self.update_noise_multiplier * self.clip_norm / denominator
        scale = num_updates / denominator  # the aggregator's mean times n / denominator: the sum / denominator
        mean_delta = subtract(new_global, old_global)
        noise = gaussian_like(mean_delta, std, generator)
        noisy = {
            k: (old_global[k].float() + mean_delta[k] * scale + noise[k]).to(old_global[k].dtype) for k in old_global
        }
        if self.adaptive_clipping:
            count, n = self._pending_count if self._pending_count is not None else (0.0, 0)
            self.update_clip(count, n, generator)
        self._pending_count = None
        return noisy

    def update_clip(self, unclipped_count: float, num_updates: int, generator: torch.Generator | None = None) -> float:
        """Geometric clip update from this round's noised, centred unclipped fraction; returns the new C.

        ``sum_i (b_i - 1/2) + N(0, sigma_b^2)``, divided by :meth:`denominator`, plus 1/2, clamped to
        [0, 1] (TF Privacy's ``QuantileEstimatorQuery``). Without a generator no noise is drawn.
        """
        noise = 0.0
        if self.clipped_count_stddev > 0 and generator is not None:
            noise = float(torch.randn((), generator=generator, dtype=torch.float64)) * self.clipped_count_stddev
        centred = unclipped_count - 0.5 * num_updates
        denominator = self.denominator(num_updates)
        fraction = 0.5 + (centred + noise) / denominator if denominator > 0 else 0.5
        fraction = min(1.0, max(0.0, fraction))
        self.clip_norm = self.clip_norm * math.exp(-self.clip_learning_rate * (fraction - self.target_quantile))
        return self.clip_norm

    # --- accounting -----------------------------------------------------------------------------------

    def _round_record(self, rounds: int = 1):
        sigma = self._sigma() / 2 if self.sampling == "fixed" else self._sigma()
        population, per_round = self._sampling()
        return make_record(sigma, per_round / population, rounds, self.sampling, population, per_round)

    def on_round(self, num_sampled: int | None = None, population: int | None = None) -> None:
        """Compose one round's Gaussian event (optionally updating the sampling parameters first)."""
        if population is not None:
            self.population = int(population)
        if num_sampled is not None:
            self.clients_per_round = int(num_sampled)
        r = self._round_record()
        self.accountant.compose(r.noise_multiplier, r.sampling_rate, 1, r.sampling, r.population, r.sample_size)
        self.rounds += 1

    def on_round_end(self) -> None:
        self.on_round()

    def epsilon(self) -> float:
        return self.accountant.epsilon(self.delta)

    def epsilon_after(self, next_rounds: int) -> float:
        """ε if ``next_rounds`` more rounds ran with the current settings (nothing is recorded)."""
        return self.accountant.epsilon(self.delta, extra=[self._round_record(next_rounds)] if next_rounds else None)

    def would_exceed(self, next_rounds: int = 1) -> bool:
        """True when running ``next_rounds`` more rounds would spend more than ``target_epsilon``."""
        if self.target_epsilon is None:
            return False
        return self.epsilon_after(next_rounds) > self.target_epsilon

    # --- checkpointing --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "clip_norm": self.clip_norm,
            "rounds": self.rounds,
            "population": self.population,
            "clients_per_round": self.clients_per_round,
            "accountant": self.accountant.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clip_norm = float(state["clip_norm"])
        self.rounds = int(state["rounds"])
        self.population = int(state["population"])
        self.clients_per_round = int(state["clients_per_round"])
        self.accountant.load_state_dict(state["accountant"])


@hookimpl
def fedlight_privacy() -> list[type]:
    return [DPFedAvg]
