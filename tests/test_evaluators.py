"""Evaluators: scoring on hand-made items, file validation, per-round columns, and `fedlight evaluate`."""

from __future__ import annotations

import json
from decimal import Decimal

import numpy as np
import pytest
import torch
from conftest import read_rounds, round_callback, run_fit, text_config

from fedlight.evaluators.base import resolve_data_path
from fedlight.evaluators.multiple_choice import MultipleChoice
from fedlight.evaluators.numeric_match import NumericMatch, final_number
from fedlight.evaluators.reference import Reference
from fedlight.plugins import build_registry


class ScriptedLM:
    """Scoring with known log-likelihoods and generations: checks the evaluators' own arithmetic."""

    name = "scripted"

    def __init__(self, logprobs=None, generations=None):
        self.logprobs, self.generations = logprobs or {}, generations or []

    def score(self, model, prompts, continuations, add_eos=False):
        return [(self.logprobs[c.strip()], len(c)) for c in continuations]

    def generate(self, model, prompts, max_new_tokens=None):
        return self.generations[: len(prompts)]


def _jsonl(tmp_path, rows, name="items.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_registry_has_the_evaluator_kind():
    registry = build_registry(autoload=False)
    assert {"multiple_choice", "numeric_match", "reference"} <= set(registry.names("evaluators"))


def test_multiple_choice_picks_the_most_likely_option_and_normalises_by_length(tmp_path):
    rows = [
        {"question": "q1", "choices": ["a", "bbbbbbbbbb"], "answer": 1},  # raw: a (-2 > -5); per char: b (-0.5 > -2)
        {"question": "q2", "choices": ["c", "d", "e"], "answer": "C"},  # letter answer -> index 2
        {"question": "q3", "choices": ["f", "g"], "answer": "f"},  # answer given as the choice text
    ]
    ev = MultipleChoice(_jsonl(tmp_path, rows))
    assert [i["answer"] for i in ev.items] == [1, 2, 0]
    lm = ScriptedLM({"a": -2.0, "bbbbbbbbbb": -5.0, "c": -1.0, "d": -3.0, "e": -0.5, "f": -4.0, "g": -1.0})
    result = ev.evaluate(lm, None)
    assert result.metrics["acc"] == pytest.approx(1 / 3)  # only q2 right by raw likelihood
    assert result.metrics["acc_norm"] == pytest.approx(2 / 3)  # q1 flips to the long option
    assert result.metrics["chance"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    assert result.samples[0]["generation"] == "a" and result.samples[0]["correct"] is False


@pytest.mark.parametrize(
    "row, message",
    [
        ({"question": "q", "choices": ["only"], "answer": 0}, "list of >= 2"),
        ({"question": "q", "choices": ["x", "y"], "answer": 2}, "out of range"),
        ({"question": "q", "choices": ["x", "y"], "answer": "zzz"}, "not an index"),
        ({"question": "q", "choices": ["x", "y"]}, "has no 'answer'"),
    ],
)
def test_multiple_choice_refuses_malformed_items(tmp_path, row, message):
    with pytest.raises(ValueError, match=message):
        MultipleChoice(_jsonl(tmp_path, [row]))


def test_final_number_on_generated_texts():
    rng = np.random.default_rng(0)
    for _ in range(200):  # seeded: numbers with signs, thousands commas and decimals inside text
        values = [int(v) for v in rng.integers(-10**6, 10**6, size=int(rng.integers(1, 4)))]
        decimals = bool(rng.integers(2))
        rendered = [f"{v:,}.5" if decimals else f"{v:,}" for v in values]
        text = " then ".join(f"step {s} gives" for s in rendered) + " done."
        expected = Decimal(rendered[-1].replace(",", ""))
        assert final_number(text) == expected, text
    assert final_number("no digits here") is None
    assert final_number("work: 3 + 4 = 7\n#### 1,024") == Decimal(1024)
    assert final_number("72.0") == final_number("The answer is 72")


def test_numeric_match_exact_match_on_scripted_generations(tmp_path):
    rows = [{"question": "a", "answer": "#### 7"}, {"question": "b", "answer": 24}, {"question": "c", "answer": "3,600"}]
    ev = NumericMatch(_jsonl(tmp_path, rows))
    result = ev.evaluate(ScriptedLM(generations=["so 3+4 = 7", "I think 25", "it is 3600.0 dollars"]), None)
    assert result.metrics == {"exact_match": pytest.approx(2 / 3), "has_number": 1.0}
    assert [s["correct"] for s in result.samples] == [True, False, True]
    with pytest.raises(ValueError, match="has no number"):
        NumericMatch(_jsonl(tmp_path, [{"question": "q", "answer": "seven"}]))


def test_evaluators_refuse_non_generative_tasks_and_missing_files(tiny_bert_dir):
    from fedlight.tasks.text_classification import TextClassification

    ev = MultipleChoice("example:multiple_choice.jsonl")
    with pytest.raises(ValueError, match="needs a generative LM task"):
        ev.check_task(TextClassification(str(tiny_bert_dir)))
    with pytest.raises(FileNotFoundError, match="available: multiple_choice.jsonl"):
        resolve_data_path("example:nope.jsonl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Reference("/no/such/file.jsonl")


def test_score_and_multiple_choice_match_unpadded_log_likelihoods(tiny_gpt2_dir):
    """CausalLM.score in padded batches equals one unpadded forward per (prompt, option)."""
    from transformers import AutoModelForCausalLM

    from fedlight.tasks.causal_lm import CausalLM

    task = CausalLM(str(tiny_gpt2_dir), max_length=64, generate_batch_size=5)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    ev = MultipleChoice("example:multiple_choice.jsonl")
    by_hand, correct = [], 0
    for item in ev.items:
        scores = []
        for cont in ev.continuations(item):
            p = task.prompt_ids(ev.prompt(item))
            c = task.tokenizer(cont, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0].double(), -1)
            scores.append(float(sum(logp[len(p) + j - 1, t] for j, t in enumerate(c))))
        by_hand.extend(scores)
        correct += int(np.argmax(scores)) == item["answer"]
    prompts = [ev.prompt(i) for i in ev.items for _ in i["choices"]]
    conts = [c for i in ev.items for c in ev.continuations(i)]
    assert [s for s, _ in task.score(model, prompts, conts)] == pytest.approx(by_hand, abs=1e-4)
    assert ev.evaluate(task, model).metrics["acc"] == pytest.approx(correct / len(ev.items))


def test_reference_evaluator_equals_the_task_metrics(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM

    from fedlight.tasks.causal_lm import CausalLM

    task = CausalLM(str(tiny_gpt2_dir), max_length=64)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    ev = Reference("example:reference.jsonl", batch_size=3, max_new_tokens=4)
    result = ev.evaluate(task, model)
    out = task.step(model, task.collate(ev.items))  # one batch of everything: same token-weighted perplexity
    ppl = float(torch.exp(out.preds[:, 0].sum() / out.target.sum()))
    assert result.metrics["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert set(result.metrics) == {"perplexity", "token_acc", "exact_match", "rougeL"}


def test_fit_runs_evaluators_every_n_rounds_and_fedlight_evaluate_reproduces_them(tiny_gpt2_dir, tmp_path, capsys):
    from fedlight.cli import main

    task = {"class_path": "causal_lm", "init_args": {"model_name_or_path": str(tiny_gpt2_dir), "max_length": 48,
                                                     "max_new_tokens": 4, "generate_max_examples": 4}}  # fmt: skip
    evaluators = [
        {"class_path": "multiple_choice", "init_args": {"path": "example:multiple_choice.jsonl"}},
        {"class_path": "numeric_match", "init_args": {"path": "example:numeric_match.jsonl", "max_new_tokens": 6}},
        {"class_path": "reference", "init_args": {"path": "example:reference.jsonl", "max_new_tokens": 6, "label": "chat"}},
    ]
    cfg = text_config(
        tiny_gpt2_dir, tmp_path,
        model={"task": task, "peft": {"class_path": "lora", "init_args": {"r": 2}}, "lr": 0.01,
               "evaluators": evaluators, "eval_every": 2},
        data={"dataset": {"class_path": "chatterbot_dialogue", "init_args": {"topics": ["greetings"], "max_pairs": 40}},
              "partitioner": {"class_path": "topic_clusters", "init_args": {"num_clusters": 3, "alpha": 1.0, "min_size": 1}},
              "num_clients": 3},
        federation={"rounds": 3, "clients_per_round": 2, "local_steps": 2, "export_every": 3},
    )  # fmt: skip
    fed = round_callback(run_fit(cfg, tmp_path))
    rows = read_rounds(tmp_path)
    cells = [r["val_multiple_choice_acc"] for r in rows]
    assert [c != "" for c in cells] == [True, False, True, True], cells  # round 0, every 2nd, the last
    assert rows[0]["val_chat_perplexity"] and rows[0]["val_numeric_match_exact_match"]
    samples = [json.loads(x) for x in next(tmp_path.rglob("samples.jsonl")).read_text().splitlines()]
    assert {s["evaluator"] for s in samples if "evaluator" in s} == {"multiple_choice", "numeric_match", "chat"}
    assert {s["round"] for s in samples if "evaluator" in s} == {0, 2, 3}
    (adapter,) = list(tmp_path.rglob("adapters/round-0003"))
    capsys.readouterr()
    assert main(["evaluate", str(adapter), "--out", str(tmp_path / "ev")]) == 0  # config found next to the run
    got = json.loads((tmp_path / "ev" / "evaluate.json").read_text())["metrics"]
    final = fed.history[-1]
    for key in ("multiple_choice_acc", "multiple_choice_acc_norm", "chat_perplexity", "numeric_match_exact_match"):
        assert got[key] == pytest.approx(final[f"val_{key}"], abs=1e-5), key
    assert main(["evaluate", str(tmp_path)]) == 2  # no fedlight_adapter.json there: a clear error
