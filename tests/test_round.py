"""Short real federated runs: invariants of the round (frozen, bytes, reproducibility, learning)."""

from __future__ import annotations

import pytest
import torch

from conftest import build_cli, read_rounds, round_callback, run_fit, text_config, vision_config
from fedlight.codecs.identity import IdentityCodec


def _fit_built(cli):
    dm = cli.datamodule
    dm.setup("fit")
    cli.model.build(dm.num_classes)
    return dm


@pytest.mark.parametrize("peft", ["lora", "bitfit", "head"])
def test_frozen_backbone_is_bit_identical_after_rounds(tiny_bert_dir, tmp_path, peft):
    cfg = text_config(tiny_bert_dir, tmp_path, model={"peft": {"class_path": peft}})
    cli = build_cli(cfg, tmp_path)
    dm = _fit_built(cli)
    module = cli.model
    params = dict(module.model.named_parameters())
    frozen = {n: params[n].detach().clone() for n in module.frozen_names()}
    shared = {n: params[n].detach().clone() for n in module.shared_names}
    assert frozen and shared
    cli.trainer.fit(module, datamodule=dm)
    params = dict(module.model.named_parameters())
    for name, before in frozen.items():
        assert torch.equal(params[name], before), f"frozen tensor {name} changed"
    assert any(not torch.equal(params[n], v) for n, v in shared.items()), "training changed nothing"
    fed = round_callback(cli)
    assert list(fed.global_state) == module.shared_names
    for name, value in fed.global_state.items():  # the model holds the aggregated global state
        assert torch.equal(params[name], value)


def test_bytes_logged_equal_bytes_encoded(tiny_bert_dir, tmp_path):
    cli = run_fit(text_config(tiny_bert_dir, tmp_path), tmp_path)
    fed = round_callback(cli)
    payload = len(IdentityCodec().encode(fed.global_state))
    rows = read_rounds(tmp_path)
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    cumulative = 0
    for row in rows[1:]:
        assert int(row["num_clients"]) == 2
        assert int(row["uplink_bytes"]) == 2 * payload
        assert int(row["downlink_bytes"]) == 2 * payload
        cumulative += 4 * payload
        assert float(row["cumulative_mb"]) == pytest.approx(cumulative / 1e6)
    assert fed.total_uplink == 4 * payload
    assert "val_acc" in rows[0] and rows[0]["val_acc"] != ""


def test_same_seed_gives_bit_identical_trainable_state(tiny_bert_dir, tmp_path):
    states = []
    for run in ("a", "b"):
        cfg = text_config(tiny_bert_dir, tmp_path / run)
        states.append(round_callback(run_fit(cfg, tmp_path / run)).global_state)
    assert list(states[0]) == list(states[1])
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name
    cfg = text_config(tiny_bert_dir, tmp_path / "c", seed_everything=1)
    other = round_callback(run_fit(cfg, tmp_path / "c")).global_state
    assert any(not torch.equal(other[n], states[0][n]) for n in other)


def test_local_head_never_travels_and_persists_per_client(tiny_bert_dir, tmp_path):
    cfg = text_config(
        tiny_bert_dir, tmp_path, model={"peft": {"class_path": "lora", "init_args": {"r": 2, "head": "local"}}},
        federation={"rounds": 2, "clients_per_round": 4},
    )  # fmt: skip
    cli = run_fit(cfg, tmp_path)
    fed, module = round_callback(cli), cli.model
    assert module.local_names and all("classifier" in n for n in module.local_names)
    assert not set(module.local_names) & set(fed.global_state)
    assert set(fed.client_store) == {0, 1, 2, 3}
    heads = [fed.client_store[c]["local"][module.local_names[0]] for c in range(4)]
    assert not torch.equal(heads[0], heads[1])  # each client keeps its own head


def test_accuracy_rises_over_rounds(tmp_path):
    task = {"class_path": "image_classification", "init_args": {"model": "resnet10t", "image_size": 16}}
    cfg = vision_config(
        tmp_path,
        model={"task": task, "peft": {"class_path": "full"}, "lr": 0.003},
        data={"num_clients": 6, "batch_size": 32, "partitioner": {"class_path": "dirichlet", "init_args": {"alpha": 1.0}}},
        federation={"rounds": 4, "clients_per_round": 3, "local_steps": 8},
    )
    cli = run_fit(cfg, tmp_path)
    rows = round_callback(cli).history
    accs = [r["val_acc"] for r in rows]
    assert accs[-1] > accs[0] + 0.3, accs
    assert accs[-1] > 0.5, accs
