"""Reference answers: perplexity, token accuracy, exact match and ROUGE-L on a prompt/response JSONL."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedlight.evaluators.base import EvalResult, Evaluator
from fedlight.hookspecs import hookimpl


class Reference(Evaluator):
    """Reference answers: response perplexity and token accuracy, greedy exact match and ROUGE-L F1.

    Items are ``{"prompt", "response"}``. The numbers are the causal-LM task's own (``lm_step`` /
    ``lm_metrics`` for perplexity and token accuracy, ``generate`` + ``overlap_metrics`` for exact
    match and ROUGE-L), on a held-out file instead of the federation's validation split — and they
    stay LM metrics under tasks whose training loss is something else (``dpo``).
    ``generate: false`` skips generation (perplexity only).
    """

    name = "reference"
    example_args = {"path": "example:reference.jsonl", "max_new_tokens": 4}
    needs = ("lm_step", "lm_collate", "lm_metrics", "generate")
    columns = ("prompt", "response")

    def __init__(
        self,
        path: str,
        label: str | None = None,
        max_examples: int | None = None,
        num_samples: int = 3,
        generate: bool = True,
        max_new_tokens: int = 32,
        batch_size: int = 16,
    ) -> None:
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError("reference max_new_tokens and batch_size must be >= 1")
        self.generate, self.max_new_tokens, self.batch_size = generate, max_new_tokens, batch_size
        super().__init__(path, label, max_examples, num_samples)

    def check_item(self, lineno: int, row: dict[str, Any]) -> dict[str, Any]:
        row = super().check_item(lineno, row)
        return {"prompt": str(row["prompt"]), "response": str(row["response"])}

    @torch.no_grad()
    def evaluate(self, task: Any, model: nn.Module) -> EvalResult:
        from fedlight.tasks.causal_lm import overlap_metrics

        device = next(model.parameters()).device
        metrics = task.lm_metrics().to(device)
        for start in range(0, len(self.items), self.batch_size):
            batch = {k: v.to(device) for k, v in task.lm_collate(self.items[start : start + self.batch_size]).items()}
            out = task.lm_step(model, batch)
            metrics.update(out.preds, out.target)
        result = {k: float(v) for k, v in metrics.compute().items()}
        samples: list[dict[str, Any]] = []
        if self.generate:
            prompts = [item["prompt"] for item in self.items]
            refs = [item["response"] for item in self.items]
            generations = task.generate(model, prompts, self.max_new_tokens)
            result.update(overlap_metrics(generations, refs))
            samples = [
                {"prompt": p, "generation": g, "reference": r}
                for p, g, r in list(zip(prompts, generations, refs))[: self.num_samples]
            ]
        return EvalResult(result, samples)


@hookimpl
def fedlight_evaluators() -> list[type]:
    return [Reference]
