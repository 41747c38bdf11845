"""Privacy accounting: a thin, checkpointable wrapper around Google's ``dp-accounting``.

This module does no accountant maths of its own. It keeps the list of composed mechanisms as plain
values (so it checkpoints without pickle and re-composes on load) and hands them to
``dp_accounting.rdp.RdpAccountant`` (Rényi DP; Mironov 2017, Mironov et al. 2019, Wang et al. 2019
for sampling without replacement) or ``dp_accounting.pld.PLDAccountant`` (privacy loss
distributions; Koskela et al. 2020, Doroshenko et al. 2022).

Conventions (those of dp-accounting):

* ``noise_multiplier`` is the Gaussian noise std divided by the L2 sensitivity of one unit's
  contribution *under the accountant's neighbouring relation*. The caller is responsible for that
  ratio: e.g. with replace-one adjacency the sum of clipped vectors has sensitivity 2C, so noise
  ``sigma * C`` is a noise multiplier of ``sigma / 2``.
* ``sampling="poisson"``: each unit is included independently with probability ``sampling_rate``
  (``PoissonSampledDpEvent``), add-or-remove-one adjacency.
* ``sampling="fixed"``: a fixed-size sample drawn uniformly without replacement
  (``SampledWithoutReplacementDpEvent(population, sample_size, ...)``); dp-accounting supports it
  only in the RDP accountant under replace-one adjacency (Wang et al. 2019), so the accountant's
  neighbouring relation becomes ``replace_one``.
* ``sampling_rate == 1`` (everyone, every step) is the plain Gaussian mechanism, no sampling event.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import dp_accounting
from dp_accounting import pld, rdp

Sampling = Literal["poisson", "fixed"]
Method = Literal["rdp", "pld"]
Neighboring = Literal["add_remove", "replace_one"]

_RELATIONS = {
    "add_remove": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    "replace_one": dp_accounting.NeighboringRelation.REPLACE_ONE,
}


@dataclass(frozen=True)
class ComposedRecord:
    """``steps`` self-compositions of one (sub)sampled Gaussian mechanism, as plain values."""

    noise_multiplier: float
    sampling: str
    sampling_rate: float
    steps: int
    population: int | None = None
    sample_size: int | None = None

    def same_mechanism(self, other: ComposedRecord) -> bool:
        return asdict(self) | {"steps": 0} == asdict(other) | {"steps": 0}

    def event(self) -> dp_accounting.DpEvent:
        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        if self.sampling == "fixed":
            one = dp_accounting.SampledWithoutReplacementDpEvent(self.population, self.sample_size, gaussian)
        elif self.sampling_rate >= 1.0:
            one = gaussian
        else:
            one = dp_accounting.PoissonSampledDpEvent(self.sampling_rate, gaussian)
        return dp_accounting.SelfComposedDpEvent(one, self.steps)


def check_mechanism_args(
    who: str,
    *,
    noise_multiplier: float | None,
    delta: float,
    bounds: dict[str, float],
    target_epsilon: float | None = None,
    sampling: str | None = None,
    accountant: str | None = None,
) -> None:
    """The argument checks every Gaussian mechanism shares; errors name the plugin and the field.

    ``bounds`` are the clipping norms (``clip_norm``, ``max_grad_norm``): positive and finite.
    ``noise_multiplier: null`` is allowed only with a ``target_epsilon`` to pick sigma from.
    """
    if noise_multiplier is None and target_epsilon is None:
        raise ValueError(f"{who} noise_multiplier: null needs target_epsilon (sigma is picked for the budget)")
    if noise_multiplier is not None and not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"{who} noise_multiplier must be > 0, got {noise_multiplier}")
    for field, value in bounds.items():
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{who} {field} must be > 0, got {value}")
    if not 0 < delta < 1:
        raise ValueError(f"{who} delta must be in (0, 1), got {delta}")
    if sampling is not None and sampling not in ("fixed", "poisson"):
        raise ValueError(f"{who} sampling must be 'fixed' or 'poisson', got {sampling!r}")
    if accountant is not None and accountant not in ("rdp", "pld"):
        raise ValueError(f"{who} accountant must be 'rdp' or 'pld', got {accountant!r}")
    if target_epsilon is not None and not target_epsilon > 0:
        raise ValueError(f"{who} target_epsilon must be > 0 or null, got {target_epsilon}")


def make_record(
    noise_multiplier: float,
    sampling_rate: float | None,
    steps: int,
    sampling: Sampling = "poisson",
    population: int | None = None,
    sample_size: int | None = None,
) -> ComposedRecord:
    """Validate the arguments of one composition and return its plain-value record."""
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps}")
    if sampling == "fixed":
        if population is None or population < 1:
            raise ValueError(f"population must be an integer >= 1 for fixed-size sampling, got {population}")
        if sample_size is None:
            if sampling_rate is None:
                raise ValueError("fixed-size sampling needs sample_size (or sampling_rate with population)")
            sample_size = round(sampling_rate * population)
        if not 1 <= sample_size <= population:
            raise ValueError(f"sample_size must be in [1, population={population}], got {sample_size}")
        sampling_rate = sample_size / population
        return ComposedRecord(
            float(noise_multiplier), "fixed", sampling_rate, int(steps), int(population), int(sample_size)
        )
    if sampling != "poisson":
        raise ValueError(f"sampling must be 'poisson' or 'fixed', got {sampling!r}")
    if sampling_rate is None or not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    return ComposedRecord(float(noise_multiplier), "poisson", float(sampling_rate), int(steps))


class Accountant:
    """ε spent by a sequence of (sub)sampled Gaussian mechanisms, computed by dp-accounting.

    Args:
        method: ``rdp`` (fast, slightly loose) or ``pld`` (tight; does not support fixed-size sampling).
        neighboring: adjacency; ``None`` picks it from the first composition (``poisson`` ->
            ``add_remove``, ``fixed`` -> ``replace_one``). Mixing relations is an error.
        pld_discretization: ``value_discretization_interval`` of the PLD accountant.
    """

    def __init__(
        self, method: Method = "rdp", neighboring: Neighboring | None = None, pld_discretization: float = 1e-4
    ) -> None:
        if method not in ("rdp", "pld"):
            raise ValueError(f"accountant method must be 'rdp' or 'pld', got {method!r}")
        if neighboring is not None and neighboring not in _RELATIONS:
            raise ValueError(f"neighboring must be 'add_remove', 'replace_one' or None, got {neighboring!r}")
        if not pld_discretization > 0:
            raise ValueError(f"pld_discretization must be > 0, got {pld_discretization}")
        self.method = method
        self.neighboring = neighboring
        self.pld_discretization = pld_discretization
        self.records: list[ComposedRecord] = []
        self._cache: dict[float, float] = {}

    # --- composition -------------------------------------------------------------------------------

    def _check_supported(self, record: ComposedRecord) -> Neighboring:
        wanted: Neighboring = "replace_one" if record.sampling == "fixed" else "add_remove"
        relation = self.neighboring or wanted
        if record.sampling == "fixed" and (self.method != "rdp" or relation != "replace_one"):
            raise ValueError(
                "fixed-size sampling (SampledWithoutReplacementDpEvent) is only supported by the RDP accountant "
                "under replace-one adjacency: set method='rdp' and neighboring='replace_one' (or None), "
                "or use sampling='poisson'"
            )
        return relation

    def compose(
        self,
        noise_multiplier: float,
        sampling_rate: float | None = None,
        steps: int = 1,
        sampling: Sampling = "poisson",
        population: int | None = None,
        sample_size: int | None = None,
    ) -> Accountant:
        """Record ``steps`` compositions of the sampled Gaussian mechanism; returns ``self``."""
        record = make_record(noise_multiplier, sampling_rate, steps, sampling, population, sample_size)
        self.neighboring = self._check_supported(record)
        if record.steps == 0:
            return self
        if self.records and self.records[-1].same_mechanism(record):
            last = self.records[-1]
            self.records[-1] = ComposedRecord(**(asdict(last) | {"steps": last.steps + record.steps}))
        else:
            self.records.append(record)
        self._cache.clear()
        return self

    @property
    def steps(self) -> int:
        return sum(r.steps for r in self.records)

    def _fresh(self) -> dp_accounting.PrivacyAccountant:
        relation = _RELATIONS[self.neighboring or "add_remove"]
        if self.method == "rdp":
            return rdp.RdpAccountant(neighboring_relation=relation)
        return pld.PLDAccountant(relation, value_discretization_interval=self.pld_discretization)

    def event(self, extra: list[ComposedRecord] | None = None) -> dp_accounting.DpEvent:
        """The dp-accounting event of everything composed so far (plus ``extra``, not recorded)."""
        return dp_accounting.ComposedDpEvent([r.event() for r in self.records + list(extra or [])])

    def epsilon(self, delta: float, extra: list[ComposedRecord] | None = None) -> float:
        """ε at ``delta`` of everything composed so far (0 before anything was composed)."""
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if not self.records and not extra:
            return 0.0
        if not extra and delta in self._cache:
            return self._cache[delta]
        saved = self.neighboring
        for record in extra or []:
            self.neighboring = self._check_supported(record)
        accountant = self._fresh()
        self.neighboring = saved
        accountant.compose(self.event(extra))
        eps = float(accountant.get_epsilon(delta))
        if not extra:
            self._cache[delta] = eps
        return eps

    # --- checkpointing -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "neighboring": self.neighboring,
            "pld_discretization": self.pld_discretization,
            "records": [asdict(r) for r in self.records],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["method"] != self.method:
            raise ValueError(f"accountant state is for method {state['method']!r}, this accountant is {self.method!r}")
        self.neighboring = state["neighboring"]
        self.pld_discretization = float(state["pld_discretization"])
        self.records = []
        self._cache.clear()
        for r in state["records"]:
            self.compose(
                r["noise_multiplier"], r["sampling_rate"], r["steps"], r["sampling"], r["population"], r["sample_size"]
            )


def noise_for_epsilon(
    target_epsilon: float,
    delta: float,
    sampling_rate: float | None,
    steps: int,
    sampling: Sampling = "poisson",
    population: int | None = None,
    sample_size: int | None = None,
    method: Method = "rdp",
    tol: float = 1e-3,
) -> float:
    """The smallest noise multiplier whose ε after ``steps`` compositions is ≤ ``target_epsilon``.

    The search is dp-accounting's own ``calibrate_dp_mechanism`` (bracketing + Brent's method on
    fresh accountants); the returned σ is guaranteed not to exceed the budget.
    """
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    make_record(1.0, sampling_rate, steps, sampling, population, sample_size)  # validate once
    probe = Accountant(method)

    def make_accountant() -> dp_accounting.PrivacyAccountant:
        return probe._fresh()

    def make_event(sigma: float) -> dp_accounting.DpEvent:
        return make_record(sigma, sampling_rate, steps, sampling, population, sample_size).event()

    probe._check_supported(make_record(1.0, sampling_rate, steps, sampling, population, sample_size))
    probe.neighboring = "replace_one" if sampling == "fixed" else "add_remove"
    if method == "rdp":
        bracket = dp_accounting.LowerEndpointAndGuess(1e-2, 1.0)
    else:
        # PLD with a tiny sigma is extremely slow and memory hungry, so never probe it there: the RDP
        # answer is an upper bound on the PLD one (PLD is tighter), and half of it a safe lower end.
        upper = noise_for_epsilon(
            target_epsilon, delta, sampling_rate, steps, sampling, population, sample_size, "rdp", tol
        )
        bracket = dp_accounting.ExplicitBracketInterval(upper / 2, upper + tol)
    return float(
        dp_accounting.calibrate_dp_mechanism(
            make_accountant, make_event, target_epsilon, delta, bracket_interval=bracket, tol=tol
        )
    )
