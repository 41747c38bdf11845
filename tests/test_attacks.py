"""Attack plugins: exact maths, data poisoning, and a seeded malicious set inside a real run."""

from __future__ import annotations

from statistics import NormalDist

import pytest
import torch

from conftest import build_cli, round_callback, run_fit, text_config
from fedlight.attacks.label_flip import LabelFlip
from fedlight.attacks.update_attacks import ALIE, GaussianNoise, Scaling, SignFlip
from fedlight.plugins import build_registry

REGISTRY = build_registry(autoload=False)


@pytest.mark.parametrize("entry", REGISTRY.entries["attacks"].values(), ids=lambda e: e.name)
def test_every_attack_keeps_names_and_shapes(entry):
    attack = entry.cls(**entry.cls.example_args)
    deltas = [{"w": torch.randn(3, 2), "b": torch.randn(2)} for _ in range(3)]
    out = attack.poison_updates(deltas, 10, torch.Generator().manual_seed(0))
    assert len(out) == 3
    for d in out:
        assert list(d) == ["w", "b"] and d["w"].shape == (3, 2) and bool(torch.isfinite(d["w"]).all())


def test_update_attack_maths():
    d = [{"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([3.0, 0.0])}]
    g = torch.Generator().manual_seed(0)
    assert torch.equal(SignFlip(2.0).poison_updates(d, 5, g)[0]["w"], torch.tensor([-2.0, 4.0]))
    assert torch.equal(Scaling(10.0).poison_updates(d, 5, g)[1]["w"], torch.tensor([30.0, 0.0]))
    z = NormalDist().inv_cdf((10 - (10 // 2 + 1 - 2)) / 10)  # n=10, m=2 -> s=4 -> Phi^-1(0.6)
    assert ALIE().z_for(10, 2) == pytest.approx(z) and z == pytest.approx(0.2533, abs=1e-4)
    alie = ALIE(z=1.0).poison_updates(d, 10, g)
    expected = torch.tensor([2.0, -1.0]) - torch.tensor([2.0, 2.0]).sqrt() * 1.0  # mean - z * std (unbiased)
    assert torch.allclose(alie[0]["w"], expected) and torch.equal(alie[0]["w"], alie[1]["w"])
    noise = GaussianNoise(std=0.5).poison_updates([{"w": torch.zeros(200_000)}], 5, g)[0]["w"]
    assert noise.std().item() == pytest.approx(0.5, rel=0.02)


def test_label_flip():
    batch = LabelFlip().poison_batch({"labels": torch.tensor([0, 1, 7])}, num_classes=8)
    assert torch.equal(batch["labels"], torch.tensor([7, 6, 0]))


def test_attack_config_requires_a_fraction(tiny_bert_dir, tmp_path):
    cfg = text_config(tiny_bert_dir, tmp_path, federation={"attack": "sign_flip"})
    with pytest.raises(ValueError, match="malicious_fraction"):
        run_fit(cfg, tmp_path)


def test_malicious_clients_send_poisoned_updates(tiny_bert_dir, tmp_path):
    base = {"rounds": 1, "clients_per_round": 4}
    honest = round_callback(run_fit(text_config(tiny_bert_dir, tmp_path / "h", federation=base), tmp_path / "h"))
    cfg = text_config(
        tiny_bert_dir, tmp_path / "a", federation={**base, "attack": {"class_path": "scaling", "init_args": {"factor": 100.0}},
                                                  "malicious_fraction": 0.5},
    )  # fmt: skip
    attacked = round_callback(run_fit(cfg, tmp_path / "a"))
    assert len(attacked.malicious) == 2
    assert attacked.history[-1]["num_clients"] == 4
    built = build_cli(text_config(tiny_bert_dir, tmp_path / "i", federation=base), tmp_path)
    built.datamodule.setup("fit")
    built.model.build(built.datamodule.num_classes)
    start = built.model.peft.get_state(built.model.model, built.model.shared_names)

    def drift(fed):
        return sum(float((fed.global_state[n] - start[n]).norm()) for n in start)

    assert drift(attacked) > 10 * drift(honest) > 0
