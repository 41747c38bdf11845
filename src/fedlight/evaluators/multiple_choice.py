"""Multiple choice by log-likelihood over the options (MMLU-style JSONL: question, choices, answer)."""

from __future__ import annotations

import string
from typing import Any, Literal

from torch import nn

from fedlight.evaluators.base import EvalResult, Evaluator
from fedlight.hookspecs import hookimpl

LETTERS = string.ascii_uppercase


class MultipleChoice(Evaluator):
    """Multiple choice: the option with the highest log-likelihood given the question is the model's answer.

    Items are ``{"question", "choices": [...], "answer"}`` with ``answer`` a 0-based index, a letter
    (``"B"``) or the text of the right choice (a choice's text is matched before a letter). ``scoring: choice_text`` scores each option's text as
    the continuation of ``question_template`` (the cloze form small models can do); ``scoring:
    letter`` lists the options as ``A. ...`` and scores the letters (the MMLU prompt). Metrics:
    ``acc`` (summed log-probability), ``acc_norm`` (divided by the option's length in characters,
    so long options are not penalised) and ``chance`` (mean 1/#options).
    """

    name = "multiple_choice"
    example_args = {"path": "example:multiple_choice.jsonl"}
    columns = ("question", "choices", "answer")

    def __init__(
        self,
        path: str,
        label: str | None = None,
        max_examples: int | None = None,
        num_samples: int = 3,
        scoring: Literal["choice_text", "letter"] = "choice_text",
        question_template: str = "Question: {question}\nAnswer:",
    ) -> None:
        if scoring not in ("choice_text", "letter"):
            raise ValueError(f"multiple_choice scoring must be 'choice_text' or 'letter', got {scoring!r}")
        if "{question}" not in question_template:
            raise ValueError(
                f"multiple_choice question_template must contain '{{question}}', got {question_template!r}"
            )
        self.scoring, self.question_template = scoring, question_template
        super().__init__(path, label, max_examples, num_samples)

    def check_item(self, lineno: int, row: dict[str, Any]) -> dict[str, Any]:
        row = super().check_item(lineno, row)
        choices = row["choices"]
        where = f"multiple_choice evaluator: {self.path} item {lineno}"
        if not isinstance(choices, list) or len(choices) < 2 or any(str(c).strip() == "" for c in choices):
            raise ValueError(f"{where}: 'choices' must be a list of >= 2 non-empty options")
        if len(choices) > len(LETTERS):
            raise ValueError(f"{where}: at most {len(LETTERS)} choices")
        answer = row["answer"]
        texts = [str(c) for c in choices]
        if isinstance(answer, int) and not isinstance(answer, bool):
            index = answer
        elif isinstance(answer, str) and answer in texts:  # the text of a choice wins over a letter
            index = texts.index(answer)
        elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS:
            index = LETTERS.index(answer.strip().upper())
        else:
            raise ValueError(f"{where}: 'answer' {answer!r} is not an index, a letter or one of the choices")
        if not 0 <= index < len(texts):
            raise ValueError(f"{where}: 'answer' {answer!r} is out of range for {len(texts)} choices")
        return {"question": str(row["question"]), "choices": texts, "answer": index}

    def prompt(self, item: dict[str, Any]) -> str:
        question = item["question"]
        if self.scoring == "letter":
            options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(item["choices"]))
            question = f"{question}\n{options}"
        return self.question_template.format(question=question)

    def continuations(self, item: dict[str, Any]) -> list[str]:
        if self.scoring == "letter":
            return [f" {LETTERS[i]}" for i in range(len(item["choices"]))]
        return [f" {c}" for c in item["choices"]]

    def evaluate(self, task: Any, model: nn.Module) -> EvalResult:
        prompts, conts, owner = [], [], []
        for k, item in enumerate(self.items):
            for c in self.continuations(item):
                prompts.append(self.prompt(item))
                conts.append(c)
                owner.append(k)
        scores = task.score(model, prompts, conts)
        correct = correct_norm = 0
        chance = 0.0
        samples: list[dict[str, Any]] = []
        pos = 0
        for item in self.items:
            n = len(item["choices"])
            logps = [s for s, _ in scores[pos : pos + n]]
            lengths = [max(len(c.strip()), 1) for c in conts[pos : pos + n]]
            pos += n
            pred = max(range(n), key=lambda i: logps[i])
            pred_norm = max(range(n), key=lambda i: logps[i] / lengths[i])
            correct += pred == item["answer"]
            correct_norm += pred_norm == item["answer"]
            chance += 1.0 / n
            if len(samples) < self.num_samples:
                samples.append({
                    "prompt": self.prompt(item), "generation": item["choices"][pred],
                    "reference": item["choices"][item["answer"]], "correct": pred == item["answer"],
                    "logprobs": [round(x, 4) for x in logps],
                })  # fmt: skip
        n_items = max(len(self.items), 1)
        metrics = {"acc": correct / n_items, "acc_norm": correct_norm / n_items, "chance": chance / n_items}
        return EvalResult(metrics, samples)


@hookimpl
def fedlight_evaluators() -> list[type]:
    return [MultipleChoice]
