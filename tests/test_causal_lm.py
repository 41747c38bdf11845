"""CausalLM task: response-only loss, padding/truncation edge cases, loading, ROUGE-L maths, learning."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedlight.tasks.causal_lm import (
    IGNORE_INDEX,
    CausalLM,
    lcs_length,
    normalize_text,
    rouge_l_f1,
)

from conftest import CHAT_TEMPLATE, EOS, PAD  # noqa: F401  (fixtures tiny_gpt2_dir/_chat_dir live in conftest)


def _ids(task: CausalLM, text: str, special: bool = False) -> list[int]:
    return task.tokenizer(text, add_special_tokens=special)["input_ids"]


# --- masking, padding, truncation -------------------------------------------------------------------


def test_loss_only_on_response_tokens_with_right_padding(tiny_gpt2_dir):
    task = CausalLM(str(tiny_gpt2_dir), prompt_template="Q: {prompt}\nA:", max_length=64)
    eos, pad = task.tokenizer.eos_token_id, task.tokenizer.pad_token_id
    assert pad != eos
    batch = task.collate([{"prompt": "hi", "response": " yo"}, {"prompt": "what is AI?", "response": " a field"}])
    p0, r0 = _ids(task, "Q: hi\nA:", True), _ids(task, " yo") + [eos]
    p1, r1 = _ids(task, "Q: what is AI?\nA:", True), _ids(task, " a field") + [eos]
    width = max(len(p0 + r0), len(p1 + r1))
    assert batch["input_ids"].shape == (2, width)
    for row, (p, r) in enumerate([(p0, r0), (p1, r1)]):
        n_pad = width - len(p) - len(r)
        assert batch["input_ids"][row].tolist() == p + r + [pad] * n_pad
        assert batch["labels"][row].tolist() == [IGNORE_INDEX] * len(p) + r + [IGNORE_INDEX] * n_pad
        assert batch["attention_mask"][row].tolist() == [1] * (len(p) + len(r)) + [0] * n_pad


def test_step_loss_is_mean_nll_of_response_tokens(tiny_gpt2_dir):
    task = CausalLM(str(tiny_gpt2_dir), max_length=64)
    model = task.build_model(0).eval()
    batch = task.collate([{"prompt": "hello", "response": "hi there"}, {"prompt": "a", "response": "b"}])
    out = task.step(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    nlls = []
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[b, t] != IGNORE_INDEX:
                nlls.append(-torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]])
    assert out.loss.item() == pytest.approx(torch.stack(nlls).mean().item(), rel=1e-5)
    assert out.target.tolist() == [int((labels[b] != IGNORE_INDEX).sum()) for b in range(2)]
    metrics = task.metrics(0)
    metrics.update(out.preds, out.target)
    values = metrics.compute()
    assert values["perplexity"].item() == pytest.approx(math.exp(out.loss.item()), rel=1e-4)
    assert 0.0 <= values["token_acc"].item() <= 1.0


def test_empty_prompt_and_empty_response(tiny_gpt2_dir):
    task = CausalLM(str(tiny_gpt2_dir), prompt_template="{prompt}", max_length=32)
    eos = task.tokenizer.eos_token_id
    ids, labels = task.encode({"prompt": "", "response": ""})
    assert ids == [eos, eos]  # BOS stand-in (GPT-2 uses EOS as BOS) + the response's EOS
    assert labels == [IGNORE_INDEX, eos]
    model = task.build_model(0)
    out = task.step(model, task.collate([{"prompt": "", "response": ""}, {"prompt": "x", "response": ""}]))
    assert torch.isfinite(out.loss) and out.target.tolist() == [1, 1]


def test_overlong_text_is_truncated_keeping_response_tokens(tiny_gpt2_dir):
    task = CausalLM(str(tiny_gpt2_dir), max_length=16)
    long = "what is the meaning of life and of everything else in the universe " * 5
    # long response: prompt kept whole, response tail cut (EOS lost)
    ids, labels = task.encode({"prompt": "hi", "response": long})
    p = task.prompt_ids("hi")
    assert len(ids) == 16 and labels[: len(p)] == [IGNORE_INDEX] * len(p)
    assert labels[len(p) :] == ids[len(p) :] == _ids(task, long)[: 16 - len(p)]
    # long prompt: its head is cut, exactly one response token survives and the prompt's tail is kept
    ids, labels = task.encode({"prompt": long, "response": "ok"})
    assert len(ids) == 16 and sum(lab != IGNORE_INDEX for lab in labels) == 1
    assert ids[:15] == task.prompt_ids(long)[-15:] and labels[15] == _ids(task, "ok")[0]
    batch = task.collate([{"prompt": long, "response": long}, {"prompt": "a", "response": "b"}])
    assert batch["input_ids"].shape[1] == 16


def test_non_ascii_round_trips(tiny_gpt2_dir):
    task = CausalLM(str(tiny_gpt2_dir), prompt_template="{prompt}", max_length=128)
    text = "¿Qué tal? 你好 😀 Grüße"
    ids, labels = task.encode({"prompt": text, "response": text})
    p = task.prompt_ids(text)
    assert task.tokenizer.decode(ids[: len(p)]) == text
    assert task.tokenizer.decode(ids[len(p) :], skip_special_tokens=True) == text


def test_chat_template_used_only_when_asked_and_present(tiny_gpt2_dir, tiny_gpt2_chat_dir):
    chat = CausalLM(str(tiny_gpt2_chat_dir), use_chat_template=True)
    assert chat.uses_chat_template
    assert chat.tokenizer.decode(chat.prompt_ids("hello")) == "<|user|>hello\n<|assistant|>"
    plain = CausalLM(str(tiny_gpt2_chat_dir), use_chat_template=False, prompt_template="Q: {prompt}\nA:")
    assert plain.tokenizer.decode(plain.prompt_ids("hello")) == "Q: hello\nA:"
    fallback = CausalLM(str(tiny_gpt2_dir), use_chat_template=True)  # no template: plain prompt
    assert not fallback.uses_chat_template
    assert fallback.tokenizer.decode(fallback.prompt_ids("hello")) == "hello\n"


# --- loading and validation ---------------------------------------------------------------------------


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*hub id"):
        CausalLM(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        CausalLM(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not installed"):
        CausalLM("package:surely_not_an_installed_model_package")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"max_length": 1}, "max_length"), ({"prompt_template": "no slot"}, "prompt_template"),
     ({"max_new_tokens": 0}, "max_new_tokens"), ({"num_samples": -1}, "num_samples")],
)  # fmt: skip
def test_bad_arguments_name_the_field(tiny_gpt2_dir, kwargs, field):
    with pytest.raises(ValueError, match=field):
        CausalLM(str(tiny_gpt2_dir), **kwargs)


def test_registered_and_lora_trains_only_adapters(tiny_gpt2_dir):
    from fedlight.peft.lora import LoRA
    from fedlight.plugins import build_registry

    assert build_registry(autoload=False).get("tasks", "causal_lm").cls is CausalLM
    task = CausalLM(str(tiny_gpt2_dir), max_length=32)
    model = LoRA(r=2, alpha=4).apply(task.build_model(0), task.family, task.head_modules(task.build_model(0)))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    task.step(model, task.collate([{"prompt": "hi", "response": "hello"}])).loss.backward()


# --- ROUGE-L ---------------------------------------------------------------------------------------------


def test_rouge_l_against_hand_computed_examples():
    assert lcs_length("a b c d".split(), "b d".split()) == 2
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5: P = R = F = 5/6
    assert rouge_l_f1("the cat sat on the mat", "The cat is on the mat.") == pytest.approx(5 / 6)
    # LCS = "the gunman" = 2; P = 2/4, R = 2/6, F = 2PR/(P+R) = 0.4
    assert rouge_l_f1("police killed the gunman", "the gunman was killed by police") == pytest.approx(0.4)
    assert rouge_l_f1("", "") == 1.0 and rouge_l_f1("x", "") == 0.0 and rouge_l_f1("a b", "c d") == 0.0
    assert normalize_text("  Hello\n  World ") == normalize_text("hello world")


# --- learning -----------------------------------------------------------------------------------------------

COLORS = "red green blue yellow black white orange purple".split()
NOUNS = "cat dog car hat box cup".split()


def _colour_pairs(pairs):
    return [{"prompt": f"name a {c} thing.", "response": f" a {c} {n} is {c}."} for c, n in pairs]


def test_tiny_gpt2_learns_held_out_loss_falls_and_generation_runs(tiny_gpt2_dir):
    torch.manual_seed(0)
    task = CausalLM(str(tiny_gpt2_dir), max_length=32, max_new_tokens=8, num_samples=2)
    model = task.build_model(0)
    combos = [(c, n) for c in COLORS for n in NOUNS]
    held_out = _colour_pairs(combos[5::6])
    train = _colour_pairs([p for i, p in enumerate(combos) if i % 6 != 5])
    val_batch = task.collate(held_out)

    def held_out_metrics():
        model.eval()
        with torch.no_grad():
            out = task.step(model, val_batch)
        metrics = task.metrics(0)
        metrics.update(out.preds, out.target)
        model.train()
        return out.loss.item(), metrics.compute()["perplexity"].item()

    loss0, ppl0 = held_out_metrics()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(40):
        idx = torch.randperm(len(train), generator=generator)[:8].tolist()
        loss = task.step(model, task.collate([train[i] for i in idx])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    loss1, ppl1 = held_out_metrics()
    print(f"held-out loss {loss0:.3f} -> {loss1:.3f}, perplexity {ppl0:.1f} -> {ppl1:.1f}")
    assert loss1 < 0.6 * loss0 and ppl1 < ppl0 / 5, (loss0, loss1, ppl0, ppl1)

    result = task.generate_eval(model, held_out)
    assert set(result.metrics) == {"exact_match", "rougeL"}
    assert 0.0 <= result.metrics["exact_match"] <= 1.0 and 0.0 < result.metrics["rougeL"] <= 1.0
    assert len(result.samples) == 2 and result.samples[0][0] == held_out[0]["prompt"]
    assert model.training  # generate_eval restores the mode


def test_left_padded_batched_generation_matches_one_by_one(tiny_gpt2_dir):
    task = CausalLM(str(tiny_gpt2_dir), max_new_tokens=5, generate_batch_size=4)
    model = task.build_model(0).eval()
    prompts = ["hi", "what is the meaning of life?", "", "¿Qué tal?"]
    batched = task.generate(model, prompts)
    task.generate_batch_size = 1
    assert batched == task.generate(model, prompts)


def test_package_with_one_gguf_file_resolves_without_import(tmp_path, monkeypatch):
    pkg = tmp_path / "fake_gguf_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import a_dependency_that_is_not_installed\n")
    (pkg / "Tiny.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    task = CausalLM("package:fake_gguf_pkg")
    assert task.path == pkg and task.gguf_file == "Tiny.Q4_1.gguf"
    direct = CausalLM(str(pkg / "Tiny.Q4_1.gguf"))
    assert direct.path == pkg and direct.gguf_file == "Tiny.Q4_1.gguf"
    with pytest.raises(FileNotFoundError, match="gguf_file"):
        CausalLM(str(pkg), gguf_file="other.gguf")
