"""LoRA-aware aggregation: exactness claims checked numerically, heterogeneous-rank maths by hand, and
short real rounds (tiny BERT) for every method, plus a bit-identical resume of a merging method."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import round_callback, run_fit, text_config
from fedlight.aggregators.lora_aware import FedExLoRA, FlexLoRA, FLoRA, HetLoRA
from fedlight.core.checkpoint import AtomicCheckpointIO
from fedlight.core.update import DecodedUpdate
from fedlight.peft.lora_variants import LoraPair, lora_layout

S = 0.5  # LoRA scaling alpha / r
PAIRS = [
    LoraPair(a="l0.A", b="l0.B", base="l0.W", scaling=S, r=3),
    LoraPair(a="l1.A", b="l1.B", base="l1.W", scaling=S, fan_in_fan_out=True, r=3),  # GPT-2 Conv1D layout
]
SHAPES = {"l0.A": (3, 5), "l0.B": (4, 3), "l1.A": (3, 6), "l1.B": (2, 3), "head": (2,)}
BASE = {"l0.W": (4, 5), "l1.W": (6, 2)}


def _rand(shape, g):
    return torch.randn(shape, generator=g)


def _setup(num_clients=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    global_state = {n: _rand(s, g) for n, s in SHAPES.items()}
    base = {n: _rand(s, g) for n, s in BASE.items()}
    updates = [
        DecodedUpdate(k, n, {name: 0.3 * _rand(s, g) for name, s in SHAPES.items()})
        for k, n in zip(range(num_clients), [5, 20, 11, 7][:num_clients])
    ]
    return global_state, base, updates


def _effective(pair, base, state):
    """W0 + s·BA in the base layout (fp64)."""
    return base[pair.base].double() + pair.delta(state[pair.b], state[pair.a])


def _bound(agg):
    agg.bind_lora(PAIRS)
    return agg


@pytest.mark.parametrize("cls", [FedExLoRA, FLoRA])
def test_merging_aggregators_are_exact(cls):
    """Global effective weight after aggregation == weighted mean of the clients' effective weights."""
    global_state, base, updates = _setup()
    agg = _bound(cls())
    new, base_delta = agg.aggregate_with_base(global_state, updates)
    assert set(base_delta) == {"l0.W", "l1.W"}
    p = [u.num_examples / sum(x.num_examples for x in updates) for u in updates]
    merged = {n: (base[n].double() + base_delta[n].double()).float() for n in base}
    for pair in PAIRS:
        clients = [{n: global_state[n] + u.delta[n] for n in (pair.a, pair.b)} for u in updates]
        target = sum(w * _effective(pair, base, c) for c, w in zip(clients, p))
        got = _effective(pair, merged, new)
        assert torch.allclose(got, target, atol=1e-5, rtol=1e-5), (cls.name, pair.base)
        naive = _effective(pair, base, {n: sum(w * c[n] for c, w in zip(clients, p)) for n in (pair.a, pair.b)})
        assert not torch.allclose(naive, target, atol=1e-3)  # plain FedAvg of the factors is not exact
    # non-LoRA tensors: FedAvg
    fedavg_head = global_state["head"] + sum(w * u.delta["head"] for u, w in zip(updates, p))
    assert torch.allclose(new["head"], fedavg_head, atol=1e-6)


def test_fedex_lora_averages_the_factors_and_flora_restarts_them():
    global_state, _, updates = _setup()
    p = [u.num_examples / sum(x.num_examples for x in updates) for u in updates]
    fedex, _ = _bound(FedExLoRA()).aggregate_with_base(global_state, updates)
    for name in ("l0.A", "l0.B", "l1.A", "l1.B"):
        mean = global_state[name] + sum(w * u.delta[name] for u, w in zip(updates, p))
        assert torch.allclose(fedex[name], mean, atol=1e-6)
    flora = _bound(FLoRA(seed=3))
    first, _ = flora.aggregate_with_base(global_state, updates)
    second, _ = flora.aggregate_with_base(global_state, updates)
    again, _ = _bound(FLoRA(seed=3)).aggregate_with_base(global_state, updates)
    for pair in PAIRS:
        assert torch.count_nonzero(first[pair.b]) == 0  # B restarts at zero: the merged model is the global one
        assert torch.equal(first[pair.a], again[pair.a])  # seeded re-initialisation
        assert not torch.equal(first[pair.a], second[pair.a])  # a fresh A each round
        assert first[pair.a].abs().max() <= 1 / math.sqrt(first[pair.a].shape[1])  # peft's kaiming-uniform bound


def _client_with_rank(agg, rank, start=0):
    return next(c for c in range(start, 1000) if agg.tier_rank(c) == rank)


def test_hetlora_truncation_padding_and_aggregation_by_hand():
    agg = _bound(HetLoRA(rank_tiers=[1, 2], weighting="uniform"))
    c1, c2 = _client_with_rank(agg, 1), _client_with_rank(agg, 2)
    g = torch.Generator().manual_seed(5)
    global_state = {n: _rand(s, g) for n, s in SHAPES.items()}
    view = agg.client_view(global_state, c1)
    assert torch.equal(view["l0.A"][0], global_state["l0.A"][0]) and torch.count_nonzero(view["l0.A"][1:]) == 0
    assert torch.equal(view["l0.B"][:, 0], global_state["l0.B"][:, 0]) and torch.count_nonzero(view["l0.B"][:, 1:]) == 0
    assert torch.equal(view["head"], global_state["head"])

    def trained(client, rank):  # what a rank-r client sends: changes only in its first r components
        delta = {n: torch.zeros(s) for n, s in SHAPES.items()}
        for a, b in (("l0.A", "l0.B"), ("l1.A", "l1.B")):
            delta[a][:rank] = 1.0 + client
            delta[b][:, :rank] = 2.0 + client
        delta["head"] += client
        return DecodedUpdate(client, 10, delta)

    u1, u2 = trained(c1, 1), trained(c2, 2)
    new = agg.aggregate(global_state, [u1, u2])
    noisy = DecodedUpdate(c1, 10, {k: v + (0.5 if k != "head" else 0.0) for k, v in u1.delta.items()})
    noisy_new = agg.aggregate(global_state, [noisy, u2])  # beyond its rank, what client c1 sends is ignored
    for a in ("l0.A", "l1.A"):
        assert torch.equal(noisy_new[a][1:], new[a][1:])
    v1, v2 = agg.client_view(global_state, c1), agg.client_view(global_state, c2)
    for a, b in (("l0.A", "l0.B"), ("l1.A", "l1.B")):
        # component 0: both clients' values, averaged
        assert torch.allclose(new[a][0], ((v1[a] + u1.delta[a])[0] + (v2[a] + u2.delta[a])[0]) / 2)
        assert torch.allclose(new[b][:, 0], ((v1[b] + u1.delta[b])[:, 0] + (v2[b] + u2.delta[b])[:, 0]) / 2)
        # component 1: only the rank-2 client holds it (the rank-1 client's zero padding is not averaged in)
        assert torch.allclose(new[a][1], (v2[a] + u2.delta[a])[1]) and torch.allclose(new[b][:, 1], (v2[b] + u2.delta[b])[:, 1])
        # component 2: no sampled client holds it, the global value is kept
        assert torch.equal(new[a][2], global_state[a][2]) and torch.equal(new[b][:, 2], global_state[b][:, 2])
    assert torch.allclose(new["head"], global_state["head"] + (c1 + c2) / 2)


def test_hetlora_sparsity_weights_and_self_pruning():
    agg = _bound(HetLoRA(rank_tiers=[2], weighting="sparsity", prune_fraction=0.5, prune_threshold=0.2))
    global_state = {n: torch.zeros(s) for n, s in SHAPES.items()}
    big, small = torch.zeros(3, 5), torch.zeros(3, 5)
    big[0, 0], big[1, 1] = 3.0, 2.0
    small[0, 0], small[1, 1] = 1.0, 0.01  # small's second component is tiny: it self-prunes
    updates = []
    for client, a in ((0, big), (1, small)):
        d = {n: torch.zeros(s) for n, s in SHAPES.items()}
        d["l0.A"], d["l0.B"] = a.clone(), torch.zeros(4, 3)
        d["l0.B"][0, 0], d["l0.B"][1, 1] = 1.0, 1.0
        updates.append(DecodedUpdate(client, 1, d))
    norms = [math.sqrt(13.0), math.sqrt(1.0 + 1e-4)]  # ‖B_k A_k‖_F (the global factors are zero)
    assert agg.weights(global_state, updates) == pytest.approx([n / sum(norms) for n in norms], rel=1e-6)
    agg.aggregate(global_state, updates)
    # tail shares: client 0 2/√13 ≈ 0.55 ≥ 0.2 keeps rank 2; client 1 0.01/1 < 0.2 drops to rank 1
    assert agg.rank_of(0) == 2 and agg.rank_of(1) == 1
    assert agg.state_dict() == {"pruned": {"1": 1}}
    restored = _bound(HetLoRA(rank_tiers=[2]))
    restored.load_state_dict(agg.state_dict())
    assert restored.rank_of(1) == 1 and torch.count_nonzero(restored.client_view({**global_state, "l0.A": torch.ones(3, 5)}, 1)["l0.A"][1:]) == 0


def test_flexlora_svd_truncation_is_the_best_rank_r_approximation():
    global_state, _, updates = _setup(seed=2)
    agg = _bound(FlexLoRA(rank_tiers=[1, 3], weighting="uniform"))
    new = agg.aggregate(global_state, updates)
    for pair in PAIRS:
        clients = [agg.client_state(global_state, u, (pair.a, pair.b)) for u in updates]
        target = sum(c[pair.b] @ c[pair.a] for c in clients) / len(clients)
        sigma = torch.linalg.svdvals(target)
        for rank in (1, 2, 3):
            b, a = new[pair.b][:, :rank].double(), new[pair.a][:rank].double()
            err = torch.linalg.matrix_norm(target - b @ a)  # Eckart–Young: the tail singular values
            assert err == pytest.approx(float(sigma[rank:].pow(2).sum().sqrt()), abs=1e-5)
        c1 = _client_with_rank(agg, 1)
        view = agg.client_view(new, c1)
        assert torch.count_nonzero(view[pair.a][1:]) == 0 and torch.equal(view[pair.a][0], new[pair.a][0])


def test_rank_tiers_and_layout_errors():
    with pytest.raises(ValueError, match="exceed the model's LoRA rank"):
        HetLoRA(rank_tiers=[2, 4]).bind_lora(PAIRS)
    with pytest.raises(ValueError, match="rank_probs"):
        FlexLoRA(rank_tiers=[1, 2], rank_probs=[0.5])
    with pytest.raises(ValueError, match="no LoRA layers"):
        FedExLoRA().bind_lora([])
    lora_state = {"m.lora_A.default.weight": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match="bind_lora"):  # an engine that never bound the layout cannot silently FedAvg
        FedExLoRA().aggregate(lora_state, [DecodedUpdate(0, 1, lora_state)])
    agg = FlexLoRA(rank_tiers=[1, 2, 3], rank_seed=7)
    assert [agg.tier_rank(c) for c in range(20)] == [FlexLoRA(rank_tiers=[1, 2, 3], rank_seed=7).tier_rank(c) for c in range(20)]
    assert len({agg.tier_rank(c) for c in range(50)}) == 3


def test_layout_matches_peft_delta_weight(tiny_bert_dir, tiny_gpt2_dir):
    """Our W0 + s·BA convention (scaling, Conv1D transpose) is peft's own get_delta_weight."""
    from fedlight.peft.lora import LoRA
    from fedlight.tasks.causal_lm import CausalLM
    from fedlight.tasks.text_classification import TextClassification

    for task in (TextClassification(str(tiny_bert_dir), max_length=16), CausalLM(str(tiny_gpt2_dir), max_length=16)):
        torch.manual_seed(0)
        model = LoRA(r=2, alpha=6).apply(task.build_model(3), task.family, task.head_modules(task.build_model(3)))
        modules = dict(model.named_modules())
        pairs = lora_layout(model)
        assert pairs
        for pair in pairs:
            layer = modules[pair.a.removesuffix(".lora_A.default.weight")]
            torch.nn.init.normal_(layer.lora_B["default"].weight)
            state = dict(model.named_parameters())
            ours = pair.delta(state[pair.b], state[pair.a])
            assert ours.shape == state[pair.base].shape
            assert torch.allclose(ours.float(), layer.get_delta_weight("default"), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Real short rounds (tiny BERT)
# ------------------------------------------------------------------------------------------------


def _run(tiny_bert_dir, tmp_path, peft="lora", aggregator=None, rounds=2, **fed):
    cfg = text_config(
        tiny_bert_dir,
        tmp_path,
        model={"peft": {"class_path": peft, "init_args": {"r": 2, "alpha": 4}}},
        federation={"rounds": rounds, **({"aggregator": aggregator} if aggregator else {}), **fed},
    )
    return run_fit(cfg, tmp_path)


def test_fedex_lora_round_merges_into_base_and_counts_it(tiny_bert_dir, tmp_path):
    cli = _run(tiny_bert_dir, tmp_path, aggregator="fedex_lora", checkpoint_every=0)
    fed, module = round_callback(cli), cli.model
    pairs = lora_layout(module.model)
    assert set(fed.base_total) == {p.base for p in pairs}  # exactly the adapted base weights changed
    assert all(bool(v.abs().sum() > 0) for v in fed.base_total.values())
    assert module.kept_frozen == set(fed.base_total)
    # every other frozen tensor is bit-identical to the pretrained one; the merged ones moved by base_total
    from fedlight.peft.lora import LoRA

    task = module.task
    fresh = LoRA(r=2, alpha=4).apply(task.build_model(module.num_classes), task.family, task.head_modules(task.build_model(module.num_classes)))
    before, after = dict(fresh.named_parameters()), dict(module.model.named_parameters())
    for name in module.frozen_names():
        if ".classifier." in name:  # peft's frozen copy of the randomly initialised head
            continue
        if name in fed.base_total:
            assert torch.allclose(after[name], before[name] + fed.base_total[name], atol=1e-6)
        else:
            assert torch.equal(after[name], before[name]), name
    rows = [r for r in fed.history if r["round"] > 0]
    lora_only = fed.server.broadcast(fed.global_state)
    base_bytes = len(fed.server.broadcast(fed.base_total))
    # round 2's clients received the trainable state and the merged base change; round 1's only the former
    assert rows[0]["downlink_bytes"] == 2 * len(lora_only)
    assert rows[1]["downlink_bytes"] == 2 * (len(lora_only) + base_bytes)


def test_flora_round_restarts_b_and_merges(tiny_bert_dir, tmp_path):
    fed = round_callback(_run(tiny_bert_dir, tmp_path, aggregator={"class_path": "flora", "init_args": {"seed": 1}}, checkpoint_every=0))
    pairs = fed.aggregator.pairs
    assert pairs and all(torch.count_nonzero(fed.global_state[p.b]) == 0 for p in pairs)
    assert set(fed.base_total) == {p.base for p in pairs}


def test_ffa_lora_keeps_a_frozen_and_ships_only_b(tiny_bert_dir, tmp_path):
    torch.manual_seed(0)
    cli = _run(tiny_bert_dir, tmp_path, peft="ffa_lora", checkpoint_every=0)
    module, fed = cli.model, round_callback(cli)
    shared = module.shared_names
    assert not any("lora_A" in n for n in shared) and any("lora_B" in n for n in shared)
    a_names = [n for n, _ in module.model.named_parameters() if "lora_A" in n]
    assert a_names and not set(a_names) & set(module.peft.trainable_names(module.model))
    # A is peft's seeded init, identical in a fresh build under the same seed: it never changed
    fresh = _run(tiny_bert_dir, tmp_path / "again", peft="ffa_lora", rounds=1, checkpoint_every=0).model
    params, fresh_params = dict(module.model.named_parameters()), dict(fresh.model.named_parameters())
    for n in a_names:
        assert torch.equal(params[n], fresh_params[n]), n
    assert any(bool(fed.global_state[n].abs().sum() > 0) for n in shared if "lora_B" in n)  # B learned


def test_fedsa_lora_b_never_leaves_the_client(tiny_bert_dir, tmp_path):
    cli = _run(tiny_bert_dir, tmp_path, peft="fedsa_lora", checkpoint_every=0, rounds=3)
    module, fed = cli.model, round_callback(cli)
    assert not any("lora_B" in n for n in fed.global_state)  # the travelling state (every payload) has no B
    assert any("lora_A" in n for n in fed.global_state)
    b_names = [n for n in module.local_names if "lora_B" in n]
    assert b_names
    locals_ = {c: s["local"] for c, s in fed.client_store.items() if "local" in s}
    assert len(locals_) >= 2
    first, second = list(locals_.values())[:2]
    assert all(bool(first[n].abs().sum() > 0) for n in b_names)  # each client's B trained and persisted
    assert not all(torch.equal(first[n], second[n]) for n in b_names)  # and is its own


@pytest.mark.parametrize("name", ["hetlora", "flexlora"])
def test_heterogeneous_rank_rounds(name, tiny_bert_dir, tmp_path, monkeypatch):
    """Low-rank clients' updates stay zero beyond their rank; the run completes and learns something."""
    cls = {"hetlora": HetLoRA, "flexlora": FlexLoRA}[name]
    seen = []
    original = cls.aggregate_with_base

    def spy(self, global_state, updates):
        seen.extend((self.rank_of(u.client_id), u.delta) for u in updates)
        return original(self, global_state, updates)

    monkeypatch.setattr(cls, "aggregate_with_base", spy)
    agg = {"class_path": name, "init_args": {"rank_tiers": [1, 2]}}
    fed = round_callback(_run(tiny_bert_dir, tmp_path, aggregator=agg, checkpoint_every=0, clients_per_round=4))
    pairs = fed.aggregator.pairs
    assert pairs and len(seen) == 8
    assert {r for r, _ in seen} == {1, 2}
    for rank, delta in seen:
        for p in pairs:
            assert torch.count_nonzero(delta[p.a][rank:]) == 0 and torch.count_nonzero(delta[p.b][:, rank:]) == 0
        assert any(bool(delta[p.a][:rank].abs().sum() > 0) for p in pairs)


def test_lora_aggregator_needs_both_factors_travelling(tiny_bert_dir, tmp_path):
    from fedlight.errors import ConfigError

    with pytest.raises(ConfigError, match="no LoRA layers"):
        _run(tiny_bert_dir, tmp_path, peft="ffa_lora", aggregator="fedex_lora", rounds=1)
    with pytest.raises(ConfigError, match="exceed the model's LoRA rank"):  # the model has r=2
        _run(tiny_bert_dir, tmp_path / "r", aggregator={"class_path": "hetlora", "init_args": {"rank_tiers": [2, 4]}}, rounds=1)
    # export_every without export_merged is fine with a merging aggregator: tests/test_export.py


def _last_ckpt(path):
    (ckpt,) = sorted(path.rglob("round-0003.ckpt"))
    return AtomicCheckpointIO().load_checkpoint(ckpt)


@pytest.mark.slow
def test_fedex_lora_resume_is_bit_identical(tiny_bert_dir, tmp_path):
    """Merged base weights are checkpointed; resuming from round 2 gives round 3 bit for bit."""
    from fedlight.cli import run_cli

    full = round_callback(_run(tiny_bert_dir, tmp_path / "full", aggregator="fedex_lora", rounds=3))
    assert full.base_total
    cfg_path = sorted((tmp_path / "full").glob("config-*.yaml"))[0]
    (mid,) = sorted((tmp_path / "full").rglob("round-0002.ckpt"))
    mid_state = AtomicCheckpointIO().load_checkpoint(mid)["state_dict"]
    for name in full.base_total:  # the merged frozen weights are in the round checkpoint
        assert f"model.{name}" in mid_state
    import yaml

    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "resumed" / "runs")
    resumed_cfg = tmp_path / "resumed.yaml"
    resumed_cfg.write_text(yaml.safe_dump(cfg))
    resumed = round_callback(run_cli(["fit", "--config", str(resumed_cfg), "--ckpt_path", str(mid)]))
    assert not list((tmp_path / "resumed").rglob("round-000[12].ckpt"))  # it really ran only round 3
    assert [r["round"] for r in resumed.history] == [0, 1, 2, 3]
    assert all(torch.equal(full.base_total[k], resumed.base_total[k]) for k in full.base_total)
    a, b = _last_ckpt(tmp_path / "full"), _last_ckpt(tmp_path / "resumed")
    assert set(a["state_dict"]) == set(b["state_dict"])
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
