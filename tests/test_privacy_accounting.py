"""Privacy accounting equals what really ran (issue 15 §5).

Every ε here is recomputed in the test by calling dp-accounting directly with the run's real
parameters (q, σ, steps, δ), never through fedlight's ``Accountant``; cohorts and batches are
checked statistically over seeds; and the released statistics' sensitivities are measured on
generated neighbouring datasets with identical noise draws.
"""

from __future__ import annotations

import itertools
import math

import dp_accounting
import numpy as np
import pytest
import torch
from conftest import read_rounds, round_callback, run_fit, text_config, vision_config
from dp_accounting import pld, rdp

from fedlight.aggregators.fedavg import FedAvg
from fedlight.codecs.identity import IdentityCodec
from fedlight.core.datamodule import RoundBatchSampler
from fedlight.core.plan import plan_round
from fedlight.core.server import ServerPipeline
from fedlight.core.update import ClientUpdate
from fedlight.privacy.base import RunSpec
from fedlight.privacy.dp_fedavg import DPFedAvg, clip_state, state_norm
from fedlight.privacy.dp_sgd import DPSGD
from fedlight.privacy.local_dp import LocalDP

UNIFORM = {"class_path": "fedavg", "init_args": {"weighting": "uniform"}}
REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE
DELTA = 1e-5


def _direct(event: dp_accounting.DpEvent, method: str = "rdp", replace_one: bool = False) -> float:
    if method == "pld":
        acc = pld.PLDAccountant(value_discretization_interval=1e-4)
    else:
        acc = rdp.RdpAccountant(neighboring_relation=REPLACE_ONE) if replace_one else rdp.RdpAccountant()
    acc.compose(event)
    return float(acc.get_epsilon(DELTA))


def _rounds(plugin, rounds: int) -> None:
    for _ in range(rounds):
        plugin.on_round_end()


# --- literature reference values ------------------------------------------------------------------


def test_tf_privacy_mnist_reference_epsilon():
    """TF Privacy's tutorial README: N=60000, batch 256, σ=1.1, 60 epochs, δ=1e-5 -> ε = 3.01.

    That figure used the classic RDP->DP conversion ε = min_α RDP(α) + log(1/δ)/(α-1) over the
    tutorial's orders; dp-accounting's RDP of the same event reproduces it, and its current (tighter,
    Canonne et al. 2020) conversion, which fedlight reports, gives 2.597.
    """
    q, steps = 256 / 60000, 60 * 60000 // 256
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    acc = rdp.RdpAccountant(orders)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.1)), steps)
    rdp_values = np.asarray(acc._rdp)  # the RDP curve, to apply the 2016-era conversion by hand
    classic = float(np.min(rdp_values + math.log(1 / DELTA) / (np.asarray(orders) - 1)))
    assert classic == pytest.approx(3.01, abs=0.01)
    ours = DPFedAvg(noise_multiplier=1.1, sampling="poisson", population=60000, clients_per_round=256)
    ours.accountant.compose(1.1, q, steps, "poisson")
    assert ours.epsilon() == pytest.approx(2.5966, abs=1e-3) and ours.epsilon() < classic


def test_issue_example_before_and_after():
    """The quickstart's shape (20 clients, 5 per round, 8 rounds, σ=1): what each sampling really costs."""
    poisson = DPFedAvg(noise_multiplier=1.0, sampling="poisson", population=20, clients_per_round=5)
    fixed = DPFedAvg(noise_multiplier=1.0, sampling="fixed", population=20, clients_per_round=5)
    _rounds(poisson, 8)
    _rounds(fixed, 8)
    assert poisson.epsilon() == pytest.approx(6.255, abs=2e-3)  # now what runs: Poisson cohorts
    assert fixed.epsilon() == pytest.approx(26.585, abs=2e-3)  # what ran before under the poisson label


# --- ε of every supported (mechanism, sampling) against dp-accounting called directly -------------


FEDAVG_CASES = [  # (sampling, accountant, sigma, N, m, rounds, adaptive, sigma_b)
    (sampling, acc, sigma, n, m, t, adaptive, sb)
    for sampling, acc in (("fixed", "rdp"), ("poisson", "rdp"), ("poisson", "pld"))
    for sigma, n, m, t, adaptive, sb in (
        (1.0, 20, 5, 8, False, None),
        (0.7, 100, 10, 30, False, None),
        (1.3, 50, 3, 12, True, None),  # default sigma_b = 0.05 m: adaptive needs 2 sigma_b > sigma
        (1.1, 1000, 100, 20, True, None),
        (2.0, 40, 40, 5, False, None),  # everyone every round
        (0.9, 60, 6, 10, True, 2.0),
    )
    if not (adaptive and 2 * (0.05 * m if sb is None else sb) <= sigma)
    and (acc == "rdp" or n in (20, 60))  # PLD is slow: two cases (plain and adaptive) suffice
]


@pytest.mark.parametrize(("sampling", "accountant", "sigma", "n", "m", "rounds", "adaptive", "sigma_b"), FEDAVG_CASES)
def test_dp_fedavg_epsilon_equals_direct_dp_accounting(sampling, accountant, sigma, n, m, rounds, adaptive, sigma_b):
    p = DPFedAvg(noise_multiplier=sigma, sampling=sampling, accountant=accountant, adaptive_clipping=adaptive,
                 clipped_count_stddev=sigma_b)  # fmt: skip
    p.bind_run(RunSpec(n, m, rounds))
    _rounds(p, rounds)
    # the accounted multiplier, rebuilt from what the mechanism really applies (Andrew et al. §3.1):
    # the sum's sigma_eff and the centred count's 2 sigma_b combine into one Gaussian
    z = (p.update_noise_multiplier**-2 + (2 * p.clipped_count_stddev) ** -2) ** -0.5 if adaptive else sigma
    assert z == pytest.approx(sigma, rel=1e-12)
    if sampling == "fixed":
        one = dp_accounting.SampledWithoutReplacementDpEvent(n, m, dp_accounting.GaussianDpEvent(z / 2))
        expected = _direct(dp_accounting.SelfComposedDpEvent(one, rounds), replace_one=True)
    else:
        gauss = dp_accounting.GaussianDpEvent(z)
        one = gauss if m == n else dp_accounting.PoissonSampledDpEvent(m / n, gauss)
        expected = _direct(dp_accounting.SelfComposedDpEvent(one, rounds), accountant)
    assert p.epsilon() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(("accountant", "sigma", "rounds"), [("rdp", 0.5, 1), ("rdp", 1.0, 7), ("rdp", 3.0, 40), ("pld", 3.0, 40)])
def test_local_dp_epsilon_equals_direct_dp_accounting(accountant, sigma, rounds):
    p = LocalDP(noise_multiplier=sigma, accountant=accountant)
    _rounds(p, rounds)
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma / 2), rounds)  # sensitivity 2C
    assert p.epsilon() == pytest.approx(_direct(event, accountant), rel=1e-6)


def test_dp_sgd_epsilon_equals_direct_dp_accounting():
    rng = np.random.default_rng(0)
    for _ in range(3):
        sizes = tuple(int(s) for s in rng.integers(3, 200, size=4))
        batch, sigma, steps = int(rng.integers(1, 40)), float(rng.uniform(0.6, 3.0)), int(rng.integers(1, 30))
        p = DPSGD(noise_multiplier=sigma)
        p.bind_run(RunSpec(4, 2, 1, batch, sizes, (steps,) * 4))
        p._round_steps = {c: {min(batch, sizes[c]): steps} for c in (0, 3)}  # what private_step records
        p.on_round_end()
        for c in (0, 3):
            b = min(batch, sizes[c])
            one = dp_accounting.SampledWithoutReplacementDpEvent(sizes[c], b, dp_accounting.GaussianDpEvent(sigma / 2))
            assert p.client_epsilons()[c] == pytest.approx(_direct(dp_accounting.SelfComposedDpEvent(one, steps), replace_one=True))


# --- refused before training -----------------------------------------------------------------------


REFUSED = [
    (lambda: DPFedAvg(sampling="poisson"), RunSpec(20, 5, client_sampling="weighted"), "client_sampling: uniform"),
    (lambda: DPFedAvg(sampling="fixed"), RunSpec(20, 5, client_sampling="weighted"), "client_sampling: uniform"),
    (lambda: DPFedAvg(sampling="poisson"), RunSpec(20, 5, min_clients=2), "min_clients: 1"),
    (lambda: DPFedAvg(sampling="fixed", accountant="pld"), None, "does not support sampling 'fixed'"),
    (lambda: DPSGD(sampling="poisson"), None, "poisson is refused"),
]


@pytest.mark.parametrize(("make", "spec", "match"), REFUSED)
def test_unsound_accounting_is_refused(make, spec, match):
    with pytest.raises(ValueError, match=match):
        make().bind_run(spec)


def test_poisson_cohorts_refuse_secure_aggregation():
    assert "sampling: fixed" in DPFedAvg(sampling="poisson").secure_aggregation_problem()
    assert DPFedAvg(sampling="fixed").secure_aggregation_problem() is None


def test_weighted_sampling_with_dp_fedavg_fails_before_training(tiny_bert_dir, tmp_path):
    fed = {"privacy": {"class_path": "dp_fedavg"}, "aggregator": UNIFORM, "client_sampling": "weighted"}
    with pytest.raises(ValueError, match="client_sampling: uniform"):
        run_fit(text_config(tiny_bert_dir, tmp_path, federation=fed), tmp_path)
    assert not list(tmp_path.rglob("rounds.csv"))  # nothing ran


# --- Poisson cohorts in the round plan -------------------------------------------------------------


@pytest.mark.parametrize(("n", "m"), [(20, 5), (7, 1), (50, 25), (3, 3)])
def test_poisson_cohort_sizes_are_binomial_over_seeds(n, m):
    q, draws = m / n, 3000
    cohorts = [plan_round(seed, r, [10] * n, m, 4, 1, None, poisson_rate=q).clients for seed in range(30) for r in range(1, 101)]
    sizes = np.array([len(c) for c in cohorts], dtype=np.float64)
    mean, var = n * q, n * q * (1 - q)
    assert len(sizes) == draws
    assert abs(sizes.mean() - mean) <= 5 * math.sqrt(var / draws) + 1e-12
    if var > 0:  # sample variance: relative std about sqrt(2 / draws)
        assert sizes.var(ddof=1) == pytest.approx(var, rel=5 * math.sqrt(2 / draws) + 0.02)
    else:
        assert (sizes == n).all()
    inclusion = np.zeros(n)
    both = 0
    for c in cohorts:
        inclusion[list(c)] += 1
        both += 0 in c and (n - 1) in c
    p_hat = inclusion / draws
    assert np.all(np.abs(p_hat - q) <= 5 * math.sqrt(q * (1 - q) / draws) + 1e-12)  # every client at rate q
    if n > 1:  # independence of two clients' inclusion
        assert abs(both / draws - q * q) <= 5 * math.sqrt(q * q * (1 - q * q) / draws) + 1e-12


def test_poisson_plan_is_seeded_resumable_and_handles_empty_cohorts():
    sizes = [0, 12, 9, 30, 5]
    plan = lambda s, r: plan_round(s, r, sizes, 2, 4, 3, None, poisson_rate=0.2)
    assert all(plan(s, r) == plan(s, r) for s in range(5) for r in range(1, 20))  # a function of (seed, round)
    assert len({plan(s, 1).clients for s in range(40)}) > 5
    empty = [plan(s, r) for s in range(20) for r in range(1, 20) if not plan(s, r).clients]
    assert len(empty) > 20  # (0.8)^5 of all draws
    for p in empty:  # nobody sampled: one placeholder step on a client with data, its update discarded
        assert p.placeholder and p.training == p.lost == (1,) and p.steps == (1,) and p.dropped_before == ()
    full = [plan(s, r) for s in range(20) for r in range(1, 20) if plan(s, r).clients]
    assert not any(p.placeholder for p in full)
    assert plan_round(3, 4, sizes, 2, 4, 3, None) == plan_round(3, 4, sizes, 2, 4, 3, None, poisson_rate=None)
    with pytest.raises(ValueError, match="same rate"):
        plan_round(0, 1, sizes, 2, 4, 3, None, sampling="weighted", poisson_rate=0.5)
    with pytest.raises(ValueError, match="poisson_rate"):
        plan_round(0, 1, sizes, 2, 4, 3, None, poisson_rate=0.0)


# --- fixed-denominator estimator and its sensitivity ---------------------------------------------


def _server(plugin: DPFedAvg) -> ServerPipeline:
    codec = IdentityCodec()
    return ServerPipeline(codec, codec, FedAvg(weighting="uniform"), plugin)


def _release(plugin: DPFedAvg, deltas: list[dict[str, torch.Tensor]], seed: int) -> dict[str, torch.Tensor]:
    glob = {"w": torch.zeros(6, dtype=torch.float64), "b": torch.zeros((), dtype=torch.float64)}
    updates = [ClientUpdate(i, 3, IdentityCodec().encode(d)) for i, d in enumerate(deltas)]
    new, report = _server(plugin).aggregate(glob, updates, torch.Generator().manual_seed(seed))
    assert len(report.accepted) == len(deltas)
    return new


def test_poisson_release_is_sum_plus_noise_over_expected_cohort():
    """old + (Σ clip(Δ_i) + N(0, σ²C²)) / (qN), for any realised cohort size, 0 included."""
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        plugin = DPFedAvg(noise_multiplier=0.8, clip_norm=0.5, sampling="poisson", population=30, clients_per_round=6)
        k = trial % 9  # realised cohort sizes 0..8 around the expected 6
        deltas = [{"w": torch.randn(6, generator=g, dtype=torch.float64) * 3 ** (i - 1),
                   "b": torch.randn((), generator=g, dtype=torch.float64)} for i in range(k)]  # fmt: skip
        out = _release(plugin, deltas, seed=trial)
        noise_gen = torch.Generator().manual_seed(trial)
        noise = {n: torch.randn(shape, generator=noise_gen, dtype=torch.float32) * 0.8 * 0.5 / 6 for n, shape in (("w", (6,)), ("b", ()))}
        clipped = [clip_state(d, 0.5)[0] for d in deltas]
        for name in ("w", "b"):
            total = sum((c[name] for c in clipped), torch.zeros_like(out[name]))
            torch.testing.assert_close(out[name], total / 6 + noise[name].double(), rtol=1e-5, atol=1e-6)


def test_empty_poisson_round_releases_noise_only_with_the_right_std():
    plugin = DPFedAvg(noise_multiplier=1.3, clip_norm=0.7, sampling="poisson", population=40, clients_per_round=4)
    old = {"w": torch.zeros(300_000)}
    new, report = _server(plugin).aggregate(old, [], torch.Generator().manual_seed(5))
    assert report.accepted == []
    assert new["w"].std().item() == pytest.approx(1.3 * 0.7 / 4, rel=0.01)  # σC/(qN) on the mean
    fixed = DPFedAvg(noise_multiplier=1.3, clip_norm=0.7, population=40, clients_per_round=4)
    same, _ = _server(fixed).aggregate(old, [], torch.Generator().manual_seed(5))
    assert torch.equal(same["w"], old["w"])  # fixed sampling: nothing arrived, nothing released


def test_adding_one_client_moves_the_poisson_release_by_at_most_c_over_qn():
    """Add-or-remove adjacency, same noise draws: the release moves by ||clip(Δ)|| / (qN) <= C/(qN).

    With the realised-count mean the same neighbours move it by far more (the denominator changes),
    which is why only the fixed denominator is accounted under add-or-remove.
    """
    rng = np.random.default_rng(1)
    worst = 0.0
    for trial in range(60):
        c, m, n_clients = float(rng.uniform(0.1, 2)), int(rng.integers(1, 8)), int(rng.integers(0, 10))
        deltas = [{"w": torch.from_numpy(rng.normal(size=6) * rng.uniform(0, 5)), "b": torch.tensor(float(rng.normal()), dtype=torch.float64)}
                  for _ in range(n_clients + 1)]  # fmt: skip
        def make(c: float = c, m: int = m) -> DPFedAvg:
            return DPFedAvg(noise_multiplier=1.0, clip_norm=c, sampling="poisson", population=50, clients_per_round=m)

        a, b = _release(make(), deltas[:-1], trial), _release(make(), deltas, trial)
        moved = state_norm({k: b[k] - a[k] for k in a})
        assert moved <= c / m * (1 + 1e-6) + 1e-9
        assert moved == pytest.approx(min(c, state_norm(deltas[-1])) / m, rel=1e-5, abs=1e-9)
        worst = max(worst, moved * m / c)
    assert worst > 0.99  # the bound is reached (clipped updates), so the test could fail


def test_adaptive_clipping_count_is_centred_with_sensitivity_one_half():
    """Adding one client moves the noised fraction by exactly 1/(2 qN) (TF Privacy's centred count)."""
    rng = np.random.default_rng(2)
    for _ in range(200):
        m, lr = int(rng.integers(2, 30)), float(rng.uniform(0.05, 0.5))
        n = int(rng.integers(0, m))  # below expected: the fraction stays inside [0, 1]
        unclipped = int(rng.integers(0, n + 1))
        def make(m: int = m, lr: float = lr) -> DPFedAvg:
            return DPFedAvg(noise_multiplier=1.0, sampling="poisson", population=100, clients_per_round=m,
                            adaptive_clipping=True, clip_learning_rate=lr, clipped_count_stddev=10.0)  # fmt: skip

        base = make().update_clip(unclipped, n)
        for below in (0, 1):  # the new client's update is clipped (b=0) or not (b=1)
            moved = math.log(make().update_clip(unclipped + below, n + 1) / base) / -lr
            assert moved == pytest.approx((below - 0.5) / m, abs=1e-12)


def test_adaptive_clipping_noise_is_what_the_accountant_assumes():
    """Measured stds: the update's sum noise is σ_eff·C and the count's σ_b, with σ = (σ_eff⁻² + (2σ_b)⁻²)^-½."""
    p = DPFedAvg(noise_multiplier=1.0, clip_norm=2.0, sampling="poisson", population=200, clients_per_round=20,
                 adaptive_clipping=True, clip_learning_rate=0.1)  # fmt: skip
    sigma_b = p.clipped_count_stddev
    assert sigma_b == pytest.approx(1.0)  # 0.05 · expected cohort, as in Andrew et al.
    old = {"w": torch.zeros(200_000)}
    p.server_transform([], torch.Generator())
    new = p.post_aggregate(old, old, 0, torch.Generator().manual_seed(0))
    measured_eff = new["w"].std().item() * 20 / 2.0
    assert measured_eff == pytest.approx(p.update_noise_multiplier, rel=0.01)
    g = torch.Generator().manual_seed(1)
    samples = []
    for _ in range(4000):
        before = p.clip_norm
        samples.append(math.log(p.update_clip(10, 20, g) / before) / -0.1)  # = (fraction - 0.5), fraction unclamped
    assert np.std(samples) * 20 == pytest.approx(sigma_b, rel=0.05)
    z = (measured_eff**-2 + (2 * np.std(samples) * 20) ** -2) ** -0.5
    assert z == pytest.approx(1.0, rel=0.03)


# --- DP-SGD batches are what its accountant assumes -----------------------------------------------


def test_dp_sgd_batches_are_independent_fixed_size_subsamples():
    n, b, steps = 25, 6, 6000
    indices = [np.arange(100, 100 + n)]
    plan = plan_round(0, 1, [n], 1, b, steps, None, batches="subsample")
    batches = [[i for _, i in batch] for batch in RoundBatchSampler(plan, indices, b, seed=3)]
    assert len(batches) == steps and all(len(x) == len(set(x)) == b for x in batches)  # no repeats within a step
    counts = np.bincount(np.concatenate(batches) - 100, minlength=n) / steps
    assert np.all(np.abs(counts - b / n) <= 5 * math.sqrt(b / n * (1 - b / n) / steps))
    # independent steps: consecutive batches overlap by b²/n on average (a shuffled pass: 0 within an epoch)
    overlap = np.mean([len(set(x) & set(y)) for x, y in itertools.pairwise(batches)])
    assert overlap == pytest.approx(b * b / n, rel=0.05)
    shuffled = [[i for _, i in batch] for batch in RoundBatchSampler(plan_round(0, 1, [n], 1, b, 4, None), indices, b, 3)]
    assert not set(shuffled[0]) & set(shuffled[1])  # the default loader is unchanged


# --- real runs -------------------------------------------------------------------------------------


def _seed_with_varied_cohorts(n: int, q: float, rounds: int) -> int:
    for seed in range(1000):
        sizes = [len(plan_round(seed, r, [1] * n, 1, 1, 1, None, poisson_rate=q).clients) for r in range(1, rounds + 1)]
        if 0 in sizes and any(s > n * q for s in sizes):
            return seed
    raise AssertionError("no seed found")


def test_poisson_dp_fedavg_run_draws_poisson_cohorts_and_reports_their_epsilon(tiny_bert_dir, tmp_path):
    rounds, sigma = 4, 1.0
    seed = _seed_with_varied_cohorts(4, 0.5, rounds)  # an empty round and a larger-than-expected one
    privacy = {"class_path": "dp_fedavg", "init_args": {"noise_multiplier": sigma, "clip_norm": 0.5, "sampling": "poisson"}}
    fed = {"rounds": rounds, "local_steps": 1, "seed": seed, "privacy": privacy, "aggregator": UNIFORM}
    run = round_callback(run_fit(text_config(tiny_bert_dir, tmp_path, federation=fed), tmp_path))
    rows = read_rounds(tmp_path)[1:]
    sizes = [run.plan_for(r).clients for r in range(1, rounds + 1)]
    assert [int(r["num_clients"]) for r in rows] == [len(c) for c in sizes]  # every sampled client was aggregated
    assert [int(r["dropped"]) for r in rows] == [0] * rounds  # the empty round's placeholder is not a dropout
    for r in range(1, rounds + 1):
        assert sizes[r - 1] == plan_round(seed, r, run.engine.population.client_sizes, 2, 8, 1, None, poisson_rate=0.5).clients
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(sigma)), rounds)
    assert float(rows[-1]["epsilon"]) == pytest.approx(_direct(event), rel=1e-9)
    assert all(math.isfinite(float(r["val_loss"])) for r in rows)


def test_dp_sgd_run_reports_the_epsilon_of_the_batches_it_drew(tmp_path):
    sigma = 1.2
    privacy = {"class_path": "dp_sgd", "init_args": {"noise_multiplier": sigma, "max_grad_norm": 1.0}}
    run = round_callback(run_fit(vision_config(tmp_path, federation={"rounds": 2, "local_steps": 2, "privacy": privacy}), tmp_path))
    sizes, batch = run.engine.population.client_sizes, run.engine.population.batch_size
    steps: dict[int, int] = {}
    for r in (1, 2):
        plan = run.plan_for(r)
        assert plan.batches == "subsample"
        for c, s in zip(plan.training, plan.steps):
            steps[c] = steps.get(c, 0) + s
    expected = {}
    for c, s in steps.items():
        one = dp_accounting.SampledWithoutReplacementDpEvent(sizes[c], min(batch, sizes[c]), dp_accounting.GaussianDpEvent(sigma / 2))
        expected[c] = _direct(dp_accounting.SelfComposedDpEvent(one, s), replace_one=True)
    got = run.privacy.client_epsilons()
    assert set(got) == set(expected)
    assert all(got[c] == pytest.approx(expected[c], rel=1e-9) for c in got)
    assert float(read_rounds(tmp_path)[-1]["epsilon"]) == pytest.approx(max(expected.values()), rel=1e-9)
