"""Numeric exact match on the final number of a greedy generation (GSM8K-style JSONL: question, answer)."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from torch import nn

from fedlight.evaluators.base import EvalResult, Evaluator
from fedlight.hookspecs import hookimpl

NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
GSM8K_MARK = "####"


def final_number(text: str) -> Decimal | None:
    """The last number in ``text`` (thousands commas allowed), as an exact Decimal; None if there is none.

    For GSM8K references (``"... #### 72"``) the number after the last ``####`` is used.
    """
    if GSM8K_MARK in text:
        text = text.rsplit(GSM8K_MARK, 1)[1]
    found = NUMBER.findall(text)
    if not found:
        return None
    try:
        return Decimal(found[-1].replace(",", ""))
    except InvalidOperation:  # pragma: no cover - the regex only matches numbers
        return None


class NumericMatch(Evaluator):
    """Numeric exact match: greedy-generate an answer; correct when its final number equals the reference's.

    Items are ``{"question", "answer"}``; ``answer`` is a number or a GSM8K solution ending in
    ``#### <number>``. Numbers compare exactly as decimals (``72`` == ``72.0`` == ``"72"``).
    Metrics: ``exact_match`` and ``has_number`` (the fraction of generations with any number).
    """

    name = "numeric_match"
    example_args = {"path": "example:numeric_match.jsonl", "max_new_tokens": 4}
    needs = ("generate",)
    columns = ("question", "answer")

    def __init__(
        self,
        path: str,
        label: str | None = None,
        max_examples: int | None = None,
        num_samples: int = 3,
        question_template: str = "Question: {question}\nAnswer:",
        max_new_tokens: int = 64,
    ) -> None:
        if "{question}" not in question_template:
            raise ValueError(f"numeric_match question_template must contain '{{question}}', got {question_template!r}")
        if max_new_tokens < 1:
            raise ValueError(f"numeric_match max_new_tokens must be >= 1, got {max_new_tokens}")
        self.question_template, self.max_new_tokens = question_template, max_new_tokens
        super().__init__(path, label, max_examples, num_samples)

    def check_item(self, lineno: int, row: dict[str, Any]) -> dict[str, Any]:
        row = super().check_item(lineno, row)
        target = final_number(str(row["answer"]))
        if target is None:
            raise ValueError(
                f"numeric_match evaluator: {self.path} item {lineno}: 'answer' {row['answer']!r} has no number"
            )
        return {"question": str(row["question"]), "answer": str(row["answer"]), "target": target}

    def evaluate(self, task: Any, model: nn.Module) -> EvalResult:
        prompts = [self.question_template.format(question=item["question"]) for item in self.items]
        generations = task.generate(model, prompts, self.max_new_tokens)
        correct = has_number = 0
        samples: list[dict[str, Any]] = []
        for item, prompt, generation in zip(self.items, prompts, generations):
            got = final_number(generation)
            ok = got is not None and got == item["target"]
            correct += ok
            has_number += got is not None
            if len(samples) < self.num_samples:
                samples.append(
                    {"prompt": prompt, "generation": generation, "reference": str(item["target"]), "correct": ok}
                )
        n = max(len(self.items), 1)
        return EvalResult({"exact_match": correct / n, "has_number": has_number / n}, samples)


@hookimpl
def fedlight_evaluators() -> list[type]:
    return [NumericMatch]
