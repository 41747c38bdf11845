"""DPO: the exact loss against a hand computation on a tiny GPT-2, the reference model, data, and a real fit."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import read_rounds, round_callback, run_fit, text_config

from fedlight.tasks.dpo import DPO, dpo_loss

PAIRS = [
    {"prompt": "hello", "chosen": "hi there", "rejected": "a red cat is red."},
    {"prompt": "how are you?", "chosen": "good, thanks", "rejected": "blue"},
    {"prompt": "tell me a joke", "chosen": "why did the chicken cross the road?", "rejected": "yes."},
]


def test_dpo_loss_formula_on_numbers():
    # r_c = 0.5 * (-1 - -2) = 0.5, r_r = 0.5 * (-3 - -2.5) = -0.25, loss = log(1 + e^-0.75)
    loss, chosen, rejected = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5]), beta=0.5
    )
    assert chosen.item() == pytest.approx(0.5) and rejected.item() == pytest.approx(-0.25)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.75)), abs=1e-7)


def _logp_by_hand(model, task, prompt: str, answer: str) -> float:
    """Sum of log p(answer token | prefix) from one unpadded forward and an explicit log-softmax."""
    p, r = task.prompt_ids(prompt), task.response_ids(answer)
    ids = torch.tensor([p + r])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logprobs = torch.log_softmax(logits, -1)
    return float(sum(logprobs[len(p) + j - 1, tok] for j, tok in enumerate(r)))


def _trained_lora(task, seed=0):
    from fedlight.peft.lora import LoRA

    model = LoRA(r=2, alpha=4).apply(task.build_model(), "transformers", [])
    with torch.no_grad():  # a policy that differs from the reference: random B factors
        g = torch.Generator().manual_seed(seed)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)
    return model.eval()


def test_dpo_step_equals_hand_computed_loss(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM

    beta = 0.3
    task = DPO(str(tiny_gpt2_dir), beta=beta, max_length=64)
    policy = _trained_lora(task)
    reference = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()  # a separate, untouched base
    out = task.step(policy, task.collate(PAIRS))
    losses, margins = [], []
    for i, ex in enumerate(PAIRS):
        pc, pr = (_logp_by_hand(policy, task, ex["prompt"], ex[s]) for s in ("chosen", "rejected"))
        rc, rr = (_logp_by_hand(reference, task, ex["prompt"], ex[s]) for s in ("chosen", "rejected"))
        margin = beta * ((pc - rc) - (pr - rr))
        losses.append(math.log1p(math.exp(-margin)))  # -log sigmoid(margin)
        margins.append(margin)
        assert out.preds[i, 0].item() == pytest.approx(beta * (pc - rc), abs=1e-4)
        assert out.preds[i, 2].item() == pytest.approx(pc, abs=1e-4)
    assert out.loss.item() == pytest.approx(sum(losses) / len(losses), abs=1e-5)
    assert any(abs(m) > 1e-2 for m in margins)  # the check is not vacuous: policy != reference
    metrics = task.metrics()
    metrics.update(out.preds, out.target)
    got = {k: float(v) for k, v in metrics.compute().items()}
    assert got["reward_margin"] == pytest.approx(sum(margins) / 3, abs=1e-5)
    assert got["reward_acc"] == pytest.approx(sum(m > 0 for m in margins) / 3)


def test_reference_is_the_base_with_the_adapter_disabled(tiny_gpt2_dir):
    from fedlight.peft.lora import LoRA

    task = DPO(str(tiny_gpt2_dir), max_length=64)
    model = LoRA(r=2).apply(task.build_model(), "transformers", []).eval()
    batch = task.joint_batch(task.collate(PAIRS))
    before = task.reference_logprobs(model, batch)
    out = task.step(model, task.collate(PAIRS))  # LoRA starts at B = 0: policy == reference
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert torch.equal(out.preds[:, 0], torch.zeros(3)) and torch.equal(out.preds[:, 1], torch.zeros(3))
    policy = _trained_lora(task)
    assert torch.allclose(task.reference_logprobs(policy, batch), before, atol=1e-5)  # adapter off = base
    assert policy.training is False  # the reference pass restores the mode it found


def test_full_fine_tuning_needs_a_reference_copy(tiny_gpt2_dir):
    from fedlight.peft.full import FullFineTuning as Full

    task = DPO(str(tiny_gpt2_dir), max_length=64)
    model = Full().apply(task.build_model(), "transformers", [])
    with pytest.raises(ValueError, match="reference: copy"):
        task.check_model(model)
    task = DPO(str(tiny_gpt2_dir), max_length=64, reference="copy")
    model = Full().apply(task.build_model(), "transformers", [])
    task.check_model(model)
    batch = task.collate(PAIRS)
    ref = task.reference_logprobs(model, task.joint_batch(batch))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    assert torch.equal(task.reference_logprobs(model, task.joint_batch(batch)), ref)  # the copy stays frozen
    with pytest.raises(ValueError, match="beta"):
        DPO(str(tiny_gpt2_dir), beta=0.0)


def test_chatterbot_preferences_pairs_real_replies_with_other_topics():
    from fedlight.data.instructions import ChatterbotDialogue
    from fedlight.data.preferences import ChatterbotPreferences

    splits = ChatterbotPreferences(topics=["greetings", "humor", "computers"], max_pairs=60, seed=3).load()
    real = {(p, r): g for g, p, r in ChatterbotDialogue(topics=["greetings", "humor", "computers"]).pairs()}
    by_reply = {}
    for g, _, r in ChatterbotDialogue(topics=["greetings", "humor", "computers"]).pairs():
        by_reply.setdefault(r, set()).add(g)
    assert len(splits.train) + len(splits.val) == 60
    for ex, group in zip(splits.train, splits.groups):
        assert real[(ex["prompt"], ex["chosen"])] == group  # chosen is the real reply
        assert ex["rejected"] != ex["chosen"] and by_reply[ex["rejected"]] - {group}  # from another topic
    again = ChatterbotPreferences(topics=["greetings", "humor", "computers"], max_pairs=60, seed=3).load()
    assert again.train == splits.train


def test_files_dataset_reads_preference_jsonl_with_metadata(tmp_path):
    from fedlight.data.files import Files
    from fedlight.evaluators.base import resolve_data_path

    path = resolve_data_path("example:preferences.jsonl")
    splits = Files(str(path), val_fraction=0.3, metadata=["category"]).load()
    ex = splits.train[0]
    assert set(ex) == {"prompt", "chosen", "rejected", "category"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})
        + "\n"
        + json.dumps({"prompt": "q", "chosen": "c", "rejected": "r"})
        + "\n"
    )
    with pytest.raises(ValueError, match="metadata column 'category'"):
        Files(str(bad), metadata=["category"]).load()


COLOURS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]


def test_federated_dpo_run_raises_reward_accuracy(tiny_gpt2_dir, tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    data = tmp_path / "prefs.jsonl"
    with data.open("w") as f:  # learnable preference: the answer names the prompt's colour
        for _ in range(200):
            c, d = rng.choice(COLOURS, size=2, replace=False)
            f.write(
                json.dumps(
                    {"prompt": f"name a {c} thing.", "chosen": f"a {c} cat is {c}.", "rejected": f"a {d} cat is {d}."}
                )
                + "\n"
            )
    task = {"class_path": "dpo", "init_args": {"model_name_or_path": str(tiny_gpt2_dir), "beta": 0.5, "max_length": 32,
                                               "max_new_tokens": 4, "generate_max_examples": 4}}  # fmt: skip
    cfg = text_config(
        tiny_gpt2_dir, tmp_path,
        model={"task": task, "peft": {"class_path": "lora", "init_args": {"r": 4, "alpha": 8, "target": "all-linear"}}, "lr": 0.02},
        data={"dataset": {"class_path": "files", "init_args": {"path": str(data), "val_fraction": 0.2}},
              "partitioner": {"class_path": "length_skew", "init_args": {"bins": 2, "alpha": 1.0}}, "batch_size": 8},
        federation={"rounds": 3, "clients_per_round": 2, "local_steps": 8},
    )  # fmt: skip
    fed = round_callback(run_fit(cfg, tmp_path))
    rows = read_rounds(tmp_path)
    acc = [float(r["val_reward_acc"]) for r in rows]
    margin = [float(r["val_reward_margin"]) for r in rows]
    assert acc[0] == 0.0 and margin[0] == 0.0  # round 0: LoRA B = 0, policy == reference
    assert max(acc) > 0.7 and acc[-1] > 0.6 and margin[-1] > 0.5, (acc, margin)
    manifest = json.loads(next(tmp_path.rglob("manifest.json")).read_text())
    assert fed.global_state and all("lora_" in n for n in fed.global_state)  # only the adapter travels
    assert manifest and "lora_" in json.dumps(manifest)


def test_reference_cache_equals_fresh_passes_and_follows_base_changes(tiny_gpt2_dir):
    import numpy as np

    rng = np.random.default_rng(0)
    words = "hello red cat blue good thanks why did the chicken cross road yes no".split()

    def text(lo, hi):
        return " ".join(rng.choice(words, int(rng.integers(lo, hi))))

    pool = [{"prompt": text(1, 14), "chosen": text(1, 10), "rejected": text(1, 10)} for _ in range(10)]
    task = DPO(str(tiny_gpt2_dir), max_length=20)  # short: some rows are truncated
    fresh = DPO(str(tiny_gpt2_dir), max_length=20, cache_reference=False)
    model = _trained_lora(task)
    computed = []
    uncounted = task.reference_logprobs
    task.reference_logprobs = lambda m, b: computed.append(b["input_ids"].shape[0]) or uncounted(m, b)
    distinct = set()
    for _ in range(8):  # seeded batches with repeats, within and across batches
        pick = [pool[i] for i in rng.choice(len(pool), size=int(rng.integers(1, 6)))]
        batch = task.collate(pick)
        joint = task.joint_batch(batch)
        assert torch.allclose(
            task.cached_reference_logprobs(model, joint), fresh.reference_logprobs(model, joint), atol=1e-5
        )
        assert torch.allclose(task.step(model, batch).loss, fresh.step(model, batch).loss, atol=1e-6)
        distinct |= {str(task.encode_pair(e["prompt"], e[side])) for e in pick for side in ("chosen", "rejected")}
    assert sum(computed) == len(distinct)  # each distinct (truncated) row went through the reference once
    joint = task.joint_batch(task.collate(pool))
    stale = task.cached_reference_logprobs(model, joint)
    with torch.no_grad():  # what a merging aggregator does: fold an update into a frozen base weight
        base = next(
            p for n, p in model.named_parameters() if not p.requires_grad and n.endswith("c_attn.base_layer.weight")
        )
        base.add_(0.05 * torch.randn(base.shape, generator=torch.Generator().manual_seed(1)))
    now = fresh.reference_logprobs(model, joint)
    assert not torch.allclose(now, stale, atol=1e-3)
    assert torch.allclose(task.cached_reference_logprobs(model, joint), now, atol=1e-5)  # recomputed, not stale


def test_reference_cache_with_dp_sgd_per_example_gradients(tiny_gpt2_dir):
    from fedlight.privacy.dp_sgd import per_sample_gradients

    # transformers' causal-LM masks are not vmappable, so DP-SGD's `auto` takes the per-example loop here
    task = DPO(str(tiny_gpt2_dir), max_length=32)
    fresh = DPO(str(tiny_gpt2_dir), max_length=32, cache_reference=False)
    model = _trained_lora(task)  # eval mode: no dropout draws, so both runs see the same policy
    batch = task.collate(PAIRS)
    for _ in range(2):  # the second pass reads every reference value from the cache
        grads, losses = per_sample_gradients(model, task, batch, "loop")
        want_grads, want_losses = per_sample_gradients(model, fresh, batch, "loop")
        assert torch.allclose(losses, want_losses, atol=1e-6)
        assert all(torch.allclose(grads[n], want_grads[n], atol=1e-6) for n in want_grads)
    assert len(task._cache) == 2 * len(PAIRS)
