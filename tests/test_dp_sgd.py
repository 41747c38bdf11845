"""Sample-level DP-SGD: exact per-example gradients, clipping bound, noise scale, accounting, and a real run."""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT, read_rounds, round_callback, run_fit, vision_config
from dp_accounting import rdp
from torch import nn

from fedlight.privacy.base import RunSpec
from fedlight.privacy.dp_sgd import DPSGD, clip_per_sample, per_sample_gradients
from fedlight.tasks.base import StepOutput, Task


class _Toy(Task):
    name = "toy"

    def step(self, model, batch):
        logits = model(batch["x"])
        return StepOutput(F.cross_entropy(logits, batch["labels"]), logits.argmax(-1), batch["labels"])


def _model_and_batch(b: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 3))
    model[1].weight.requires_grad_(False)  # a frozen tensor must get no gradient
    batch = {"x": torch.randn(b, 5) * 3, "labels": torch.randint(0, 3, (b,)), "client_id": torch.zeros(b, dtype=torch.long)}
    return model, batch


def test_vmap_per_sample_grads_equal_a_loop_of_single_example_grads():
    model, batch = _model_and_batch()
    grads, losses = per_sample_gradients(model, _Toy(), batch, "vmap")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert list(grads) == names and "1.weight" not in grads
    for i in range(6):
        model.zero_grad()
        loss = _Toy().step(model, {"x": batch["x"][i : i + 1], "labels": batch["labels"][i : i + 1]}).loss
        loss.backward()
        assert losses[i].item() == pytest.approx(loss.item(), rel=1e-6)
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(grads[n][i], p.grad, rtol=1e-5, atol=1e-7)
    loop, _ = per_sample_gradients(model, _Toy(), batch, "loop")
    for n in names:
        torch.testing.assert_close(grads[n], loop[n], rtol=1e-5, atol=1e-7)
    # and they average to the batch gradient
    model.zero_grad()
    _Toy().step(model, batch).loss.backward()
    torch.testing.assert_close(grads["0.weight"].mean(0), model[0].weight.grad, rtol=1e-5, atol=1e-6)


def test_vmap_matches_loop_on_a_peft_vit(tmp_path):
    from fedlight.peft.lora import LoRA
    from fedlight.tasks.image_classification import ImageClassification

    task = ImageClassification(**TINY_VIT["init_args"])
    torch.manual_seed(0)
    model = LoRA(r=2).apply(task.build_model(10), task.family, task.head_modules(task.build_model(10)))
    model.eval()  # no dropout: both paths must then agree exactly
    batch = {"images": torch.randn(3, 3, 16, 16), "labels": torch.tensor([1, 4, 7])}
    vm, _ = per_sample_gradients(model, task, batch, "vmap")
    lp, _ = per_sample_gradients(model, task, batch, "loop")
    assert vm and all(v.shape[0] == 3 for v in vm.values())
    for n in vm:
        torch.testing.assert_close(vm[n], lp[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("clip", [1e-3, 0.5, 10.0])
def test_clipped_per_sample_norms_never_exceed_c(clip):
    g = torch.Generator().manual_seed(0)
    grads = {"a": torch.randn(16, 30, generator=g) * torch.logspace(-4, 4, 16)[:, None], "b": torch.randn(16, generator=g)}
    grads["a"][3] = 0
    grads["b"][3] = 0
    grads["a"][5] = 3e38  # huge fp32 values: the norm must not overflow
    clipped, norms = clip_per_sample(grads, clip)
    after = torch.sqrt(sum(v.double().reshape(16, -1).pow(2).sum(1) for v in clipped.values()))
    assert bool((after <= clip).all())
    assert math.isfinite(float(norms[5])) and float(norms[5]) > 1e38
    assert float(after[3]) == 0.0
    small = norms < clip * (1 - 1e-5)  # unclipped examples are (nearly) untouched
    torch.testing.assert_close(clipped["b"][small], grads["b"][small], rtol=2e-6, atol=0)


def test_private_gradient_noise_std_is_sigma_c_over_b():
    """Zero per-example gradients: the optimizer's gradient is pure noise of std sigma*C/B."""

    class Zero(Task):
        name = "zero"

        def step(self, model, batch):
            out = model(batch["x"])
            return StepOutput((out * 0).sum(), out, batch["labels"])

    model = nn.Linear(400, 500)
    batch = {"x": torch.randn(8, 400), "labels": torch.zeros(8, dtype=torch.long)}
    p = DPSGD(noise_multiplier=1.7, max_grad_norm=0.3)
    p.on_client_start(0, torch.Generator().manual_seed(3))
    out = p.private_step(model, Zero(), batch)
    out.loss.backward()
    expected = 1.7 * 0.3 / 8
    noise = model.weight.grad.flatten()
    assert noise.std().item() == pytest.approx(expected, rel=0.01)  # 2e5 draws: sample-std error ~0.16%
    assert abs(noise.mean().item()) < 5 * expected / math.sqrt(noise.numel())
    assert out.loss.item() == 0.0


def test_private_gradient_is_clipped_sum_plus_noise_over_b():
    model, batch = _model_and_batch(b=5)
    p = DPSGD(noise_multiplier=0.5, max_grad_norm=0.2)
    p.on_client_start(0, torch.Generator().manual_seed(7))
    out = p.private_step(model, _Toy(), batch)
    model.zero_grad()
    out.loss.backward()
    grads, losses = per_sample_gradients(model, _Toy(), batch, "loop")
    clipped, _ = clip_per_sample(grads, 0.2)
    g = torch.Generator().manual_seed(7)
    for n, prm in model.named_parameters():
        if prm.requires_grad:
            noise = torch.randn(prm.shape, generator=g) * 0.5 * 0.2
            torch.testing.assert_close(prm.grad, (clipped[n].sum(0) + noise) / 5, rtol=1e-4, atol=1e-6)
    assert out.loss.item() == pytest.approx(losses.mean().item(), rel=1e-6)


def test_accounting_per_client_equals_dp_accounting():
    p = DPSGD(noise_multiplier=1.1, max_grad_norm=1.0)
    p.bind_run(RunSpec(3, 2, rounds=4, batch_size=10, client_sizes=(100, 40, 7), client_steps=(5, 5, 5)))
    p._round_steps = {0: {10: 5}, 2: {7: 5}}  # what 5 private steps of clients 0 and 2 record
    p.on_round_end()
    wor = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    wor.compose(dp_accounting.SampledWithoutReplacementDpEvent(100, 10, dp_accounting.GaussianDpEvent(0.55)), 5)
    eps = p.client_epsilons()
    assert set(eps) == {0, 2}
    assert eps[0] == pytest.approx(wor.get_epsilon(1e-5), rel=1e-9)
    assert eps[2] > eps[0] and p.epsilon() == eps[2]  # the whole (small) dataset every step costs more
    with pytest.raises(ValueError, match="poisson is refused"):
        DPSGD(noise_multiplier=1.1, sampling="poisson")


def test_target_epsilon_picks_sigma_and_refuses_bad_models():
    p = DPSGD(noise_multiplier=None, target_epsilon=3.0)
    p.bind_run(RunSpec(2, 1, rounds=3, batch_size=8, client_sizes=(80, 40), client_steps=(4, 4)))
    assert p.noise_multiplier > 0
    p._round_steps = {1: {8: 4}}
    for _ in range(3):
        p._round_steps = {1: {8: 4}}
        p.on_round_end()
    assert p.epsilon() <= 3.0 and p.epsilon() == pytest.approx(3.0, rel=0.02)
    assert p.would_exceed(1)
    with pytest.raises(ValueError, match="target_epsilon"):
        DPSGD(noise_multiplier=None)
    with pytest.raises(ValueError, match="max_grad_norm"):
        DPSGD(max_grad_norm=0)
    with pytest.raises(ValueError, match="BatchNorm"):
        DPSGD().check_model(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    frozen_bn = nn.BatchNorm1d(2).eval()
    DPSGD().check_model(nn.Sequential(nn.Linear(2, 2), frozen_bn))  # frozen statistics are fine


def test_dp_sgd_run_logs_per_client_epsilon_and_charges_every_step(tmp_path):
    cfg = vision_config(
        tmp_path,
        federation={"rounds": 2, "local_steps": 2, "privacy": {"class_path": "dp_sgd", "init_args": {"noise_multiplier": 0.8, "max_grad_norm": 1.0}}},
    )
    fed = round_callback(run_fit(cfg, tmp_path))
    rows = read_rounds(tmp_path)[1:]
    eps = [float(r["epsilon"]) for r in rows]
    assert 0 < eps[0] <= eps[1]  # the worst client so far
    per_client = fed.privacy.client_epsilons()
    assert len(per_client) >= 2 and max(per_client.values()) == eps[1]
    steps = sum(acc.steps for acc in fed.privacy.accountants.values())
    assert steps == 2 * 2 * 2  # rounds x clients per round x local steps: every private step is charged
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)


def test_dp_fedavg_null_noise_multiplier_is_picked_for_the_target_epsilon():
    from fedlight.privacy.dp_fedavg import DPFedAvg

    with pytest.raises(ValueError, match="target_epsilon"):
        DPFedAvg(noise_multiplier=None)
    p = DPFedAvg(noise_multiplier=None, target_epsilon=4.0)
    p.bind_run(RunSpec(population=20, clients_per_round=5, rounds=6))
    assert p.noise_multiplier > 0
    for _ in range(6):
        assert not p.would_exceed(1)
        p.on_round_end()
    assert p.epsilon() <= 4.0 and p.epsilon() == pytest.approx(4.0, rel=0.02) and p.would_exceed(1)
