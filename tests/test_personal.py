"""Personalised evaluation: label-matched held-out shares, and local heads that beat the global model."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import read_rounds, round_callback, run_fit, vision_config
from fedlight.core.personal import accuracy_key, label_matched_split


def test_label_matched_split_uses_each_example_once_and_follows_training_labels():
    rng = np.random.default_rng(0)
    train_labels = rng.integers(0, 4, size=400)
    # client k holds mostly class k (and a little of the next one)
    clients = [np.flatnonzero((train_labels == k) | ((train_labels == (k + 1) % 4) & (np.arange(400) % 5 == 0))) for k in range(4)]
    owner = {}
    for k, ix in enumerate(clients):  # make the training shards disjoint
        clients[k] = np.asarray([i for i in ix if owner.setdefault(int(i), k) == k])
    val_labels = rng.integers(0, 4, size=200)
    shares = label_matched_split(clients, train_labels, val_labels, seed=1)
    again = label_matched_split(clients, train_labels, val_labels, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(shares, again, strict=True))  # deterministic
    flat = np.concatenate(shares)
    assert sorted(flat.tolist()) == list(range(200))  # every validation example exactly once
    for k in range(4):
        train_p = np.bincount(train_labels[clients[k]], minlength=4) / len(clients[k])
        val_p = np.bincount(val_labels[shares[k]], minlength=4) / len(shares[k])
        assert np.abs(train_p - val_p).max() < 0.08, (k, train_p, val_p)
        assert val_p[(k + 2) % 4] == 0  # a class the client never trained on is never in its share


def test_accuracy_key():
    assert accuracy_key(["f1", "acc"]) == "acc"
    assert accuracy_key(["perplexity", "token_acc"]) == "token_acc"
    assert accuracy_key(["loss"]) is None


def test_local_heads_personalise_and_never_travel(tmp_path, monkeypatch):
    from fedlight.core.client import ClientPipeline

    payloads: list[bytes] = []
    original = ClientPipeline.finish

    def capture(self, *args, **kwargs):
        update = original(self, *args, **kwargs)
        payloads.append(update.payload)
        return update

    monkeypatch.setattr(ClientPipeline, "finish", capture)
    cfg = vision_config(
        tmp_path,
        federation={"rounds": 2, "clients_per_round": 5, "local_steps": 5, "checkpoint_every": 0, "personal_eval_every": 2},
    )
    cfg["model"]["peft"] = {"class_path": "lora", "init_args": {"r": 2, "head": "local"}}
    cfg["model"]["lr"] = 0.02
    cfg["data"]["num_clients"] = 5
    cfg["data"]["partitioner"] = {"class_path": "shards", "init_args": {"classes_per_client": 2}}
    cli = run_fit(cfg, tmp_path)
    fed = round_callback(cli)
    module = cli.model
    local, shared = set(module.local_names), list(module.shared_names)
    assert local, "head: local declared no local tensors"
    assert len(payloads) == 2 * 5
    for payload in payloads:
        names = list(fed.client.uplink.decode(payload))
        assert names == shared and not local & set(names)
    assert all(set(s["local"]) == local for s in fed.client_store.values())

    rows = read_rounds(tmp_path)
    assert rows[1]["val_acc_personal_mean"] == ""  # round 1: not due
    last = rows[-1]
    personal, global_ = float(last["val_acc_personal_mean"]), float(last["val_acc"])
    assert float(last["personal_clients"]) == 5
    assert float(last["val_acc_personal_min"]) <= personal
    assert float(last["val_acc_personal_std"]) >= 0
    # each client knows its two classes: its own head beats the global model (which has no trained head)
    assert personal > global_ + 0.2, (personal, global_)
    # the model is left as the global state between rounds: evaluation restored the initial local tensors
    state = module.peft.get_state(module.model, sorted(local))
    for name, value in state.items():
        assert bool((value == fed.initial_local[name]).all()), name


@pytest.mark.parametrize("every", [-1])
def test_negative_personal_eval_every_is_refused(every):
    from fedlight.core.round import FederatedRound

    with pytest.raises(ValueError, match="personal_eval_every must be >= 0"):
        FederatedRound(personal_eval_every=every)
