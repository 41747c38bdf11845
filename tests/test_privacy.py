"""Privacy plugins: accountant reference values, clipping bounds, noise scale, adaptive clipping, state."""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch
from dp_accounting import rdp

from fedlight.core.update import DecodedUpdate
from fedlight.plugins import build_registry
from fedlight.privacy.accounting import Accountant, noise_for_epsilon
from fedlight.privacy.dp_fedavg import DPFedAvg, clip_state, state_norm
from fedlight.privacy.local_dp import LocalDP


# --- accountant ------------------------------------------------------------------------------------


def test_rdp_reference_value_opacus_pins():
    # Opacus pins eps ~= 7.329 for sigma=1.5, q=0.04, 2250 steps, delta=1e-5 (RDP, Poisson sampling).
    # dp-accounting's RdpAccountant gives 7.32933 (optimal order 3.9): the same value to 4 digits.
    acc = Accountant("rdp").compose(1.5, 0.04, 2250, "poisson")
    assert acc.epsilon(1e-5) == pytest.approx(7.329, abs=2e-3)


def test_accountant_equals_dp_accounting_directly():
    direct = rdp.RdpAccountant()
    direct.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.1)), 30)
    ours = Accountant("rdp")
    for _ in range(30):
        ours.compose(1.1, 0.1, 1)
    assert ours.epsilon(1e-5) == pytest.approx(direct.get_epsilon(1e-5), rel=1e-12)
    assert ours.state_dict()["records"][0]["steps"] == 30  # identical rounds merge

    wor = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    wor.compose(dp_accounting.SampledWithoutReplacementDpEvent(50, 5, dp_accounting.GaussianDpEvent(0.8)), 10)
    assert Accountant().compose(0.8, None, 10, "fixed", 50, 5).epsilon(1e-5) == pytest.approx(wor.get_epsilon(1e-5))


def test_pld_equals_dp_accounting_and_rejects_fixed_sampling():
    direct = dp_accounting.pld.PLDAccountant()
    direct.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 10)
    assert Accountant("pld").compose(1.0, 0.1, 10).epsilon(1e-5) == pytest.approx(direct.get_epsilon(1e-5))
    with pytest.raises(ValueError, match="RDP"):
        Accountant("pld").compose(1.0, None, 1, "fixed", 10, 2)


def test_accountant_state_round_trip():
    acc = Accountant().compose(1.0, 0.1, 5).compose(2.0, 0.2, 3)
    other = Accountant()
    other.load_state_dict(acc.state_dict())
    assert other.epsilon(1e-5) == acc.epsilon(1e-5)
    assert other.steps == 8


def test_noise_for_epsilon_meets_the_budget():
    sigma = noise_for_epsilon(2.0, 1e-5, 0.1, 20)
    eps = Accountant().compose(sigma, 0.1, 20).epsilon(1e-5)
    assert eps <= 2.0 and eps == pytest.approx(2.0, abs=0.02)


# --- clipping ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_clipped_norm_never_exceeds_bound(dtype):
    g = torch.Generator().manual_seed(0)
    big = 6e4 if dtype == torch.float16 else 1e30 if dtype != torch.float64 else 1e300
    state = {
        "w": (torch.randn(1000, generator=g) * 1e3).to(dtype).clamp(-big, big),
        "huge": torch.full((300,), big, dtype=torch.float64).to(dtype),
        "scalar": torch.tensor(3.0, dtype=dtype),
    }
    for clip in (1e-3, 0.7, 5.0):
        out, norm = clip_state(state, clip)
        assert math.isfinite(norm) and norm > clip
        assert state_norm(out) <= clip
        assert all(out[k].dtype == dtype and out[k].shape == state[k].shape for k in state)
        assert all(torch.isfinite(v).all() for v in out.values())


def test_clipping_zeros_and_small_updates():
    zeros = {"a": torch.zeros(5), "b": torch.zeros(())}
    out, norm = clip_state(zeros, 1.0)
    assert norm == 0.0 and all(not torch.isnan(v).any() and (v == 0).all() for v in out.values())
    small = {"a": torch.full((4,), 0.1)}
    out, _ = clip_state(small, 1.0)
    assert torch.equal(out["a"], small["a"])


# --- DP-FedAvg ------------------------------------------------------------------------------------------


def test_dp_fedavg_noise_std_matches_sigma_c_over_n():
    plugin = DPFedAvg(noise_multiplier=1.3, clip_norm=0.5, population=100, clients_per_round=10)
    old = {"w": torch.zeros(400_000), "b": torch.zeros(())}
    new = {"w": torch.full((400_000,), 0.01), "b": torch.tensor(0.0)}
    out = plugin.post_aggregate(old, new, num_updates=8, generator=torch.Generator().manual_seed(1))
    noise = out["w"] - 0.01
    expected = 1.3 * 0.5 / 8
    # std of a sample std for 4e5 normal draws is expected/sqrt(2n) ~ 0.11%; allow 1%
    assert noise.std().item() == pytest.approx(expected, rel=0.01)
    assert abs(noise.mean().item()) < 5 * expected / math.sqrt(4e5)
    plugin.on_round_end()
    assert plugin.rounds == 1 and plugin.epsilon() > 0


def test_dp_fedavg_server_transform_clips_each_update():
    plugin = DPFedAvg(clip_norm=1.0, population=10, clients_per_round=3)
    updates = [
        DecodedUpdate(i, 5, {"w": torch.full((10,), float(s)), "z": torch.tensor(float(s))})
        for i, s in enumerate((0.0, 0.01, 100.0))
    ]
    out = plugin.server_transform(updates, torch.Generator().manual_seed(0))
    assert [u.client_id for u in out] == [0, 1, 2]
    assert all(state_norm(u.delta) <= 1.0 for u in out)
    assert torch.equal(out[1].delta["w"], updates[1].delta["w"])


def test_adaptive_clipping_reference_converges_to_median():
    # Andrew et al. 2021: 21 norms spread evenly over 0..10, target quantile 0.5, no count noise
    plugin = DPFedAvg(clip_norm=1.0, population=100, clients_per_round=21, adaptive_clipping=True,
                      target_quantile=0.5, clipped_count_stddev=10.0, noise_multiplier=1.0)  # fmt: skip
    norms = [10 * i / 20 for i in range(21)]
    for _ in range(300):
        unclipped = sum(n <= plugin.clip_norm for n in norms)
        plugin.update_clip(unclipped, len(norms), generator=None)  # no generator: no count noise
    assert plugin.clip_norm == pytest.approx(5.0, abs=0.25)


def test_adaptive_clipping_effective_noise_and_validation():
    p = DPFedAvg(noise_multiplier=1.0, adaptive_clipping=True, clipped_count_stddev=2.0)
    assert p.update_noise_multiplier == pytest.approx((1.0 - 1 / 16) ** -0.5)
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        DPFedAvg(noise_multiplier=2.0, adaptive_clipping=True, clipped_count_stddev=0.5)
    with pytest.raises(ValueError, match="clip_norm"):
        DPFedAvg(clip_norm=0.0)
    with pytest.raises(ValueError, match="clients_per_round"):
        DPFedAvg(population=5, clients_per_round=6)


def test_dp_fedavg_budget_and_state_round_trip():
    p = DPFedAvg(noise_multiplier=1.0, population=50, clients_per_round=5, target_epsilon=3.0)
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.zeros(3)}
    while not p.would_exceed(1):
        state = p.post_aggregate(state, state, 5, g)
        p.on_round_end()
        assert p.rounds < 500
    assert p.epsilon() <= 3.0 < p.epsilon_after(1)
    p.clip_norm = 0.37
    q = DPFedAvg(noise_multiplier=1.0, population=50, clients_per_round=5, target_epsilon=3.0)
    q.load_state_dict(p.state_dict())
    assert q.clip_norm == 0.37 and q.rounds == p.rounds and q.epsilon() == p.epsilon()


# --- local DP ---------------------------------------------------------------------------------------------


def test_local_dp_clips_and_noises():
    p = LocalDP(noise_multiplier=0.5, clip_norm=2.0)
    delta = {"w": torch.full((200_000,), 1e6)}
    out = p.client_transform(delta, torch.Generator().manual_seed(0))
    clipped, _ = clip_state(delta, 2.0)
    noise = out["w"] - clipped["w"]
    assert noise.std().item() == pytest.approx(1.0, rel=0.01)
    p.on_round_end()
    direct = rdp.RdpAccountant()
    direct.compose(dp_accounting.GaussianDpEvent(0.25))  # sensitivity 2C: multiplier sigma/2
    assert p.epsilon() == pytest.approx(direct.get_epsilon(1e-5))


# --- contract: every registered privacy plugin --------------------------------------------------------


REGISTRY = build_registry(autoload=False)


@pytest.mark.parametrize("name", REGISTRY.names("privacy"))
def test_every_privacy_plugin_constructs_and_round_trips_state(name):
    cls = REGISTRY.get("privacy", name).cls
    plugin = cls(**cls.example_args)
    assert cls.summary() != "(no description)"
    g = torch.Generator().manual_seed(0)
    old = {"w": torch.zeros(4), "s": torch.tensor(0.0)}
    delta = plugin.client_transform({"w": torch.ones(4), "s": torch.tensor(1.0)}, g)
    new = {k: old[k] + v for k, v in delta.items()}
    plugin.post_aggregate(old, new, 1, g)
    plugin.on_round_end()
    state = plugin.state_dict()
    fresh = cls(**cls.example_args)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    assert fresh.epsilon() == plugin.epsilon()


def test_sampling_comes_from_the_run_and_a_conflict_is_an_error():
    p = DPFedAvg(noise_multiplier=1.0)
    p.bind(population=40, clients_per_round=4)
    assert (p.population, p.clients_per_round) == (40, 4)
    with pytest.raises(ValueError, match="disagrees with the run"):
        DPFedAvg(population=50).bind(population=40, clients_per_round=4)
