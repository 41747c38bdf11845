"""Direct preference optimisation (DPO) of a causal LM on (prompt, chosen, rejected) examples."""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric, MetricCollection

from fedlight.data.base import Example
from fedlight.hookspecs import hookimpl
from fedlight.tasks.base import GenerationEval, StepOutput
from fedlight.tasks.causal_lm import IGNORE_INDEX, CausalLM, sequence_logprobs

ReferenceMode = Literal["adapter_disabled", "copy"]


@runtime_checkable
class SwitchableAdapter(Protocol):
    """A peft model whose adapter can be switched off (``with model.disable_adapter(): ...``)."""

    def disable_adapter(self) -> AbstractContextManager[Any]: ...


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean DPO loss and the implicit rewards (Rafailov et al. 2023, eq. 7).

    Inputs are summed response log-probabilities per pair. Rewards are ``beta * (log pi - log ref)``;
    the loss is ``-log sigmoid(r_chosen - r_rejected)``, averaged over pairs.
    """
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    return -F.logsigmoid(chosen - rejected).mean(), chosen, rejected


class _PairMean(Metric):
    """Mean over pairs of one statistic of the step's ``preds`` columns (see :meth:`DPO.step`)."""

    full_state_update = False
    total: torch.Tensor  # metric states (add_state)
    count: torch.Tensor

    def __init__(self, statistic: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.statistic = statistic
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        chosen, rejected, policy_chosen, policy_rejected = preds.double().unbind(1)
        value = {
            "reward_acc": (chosen > rejected).double(),
            "reward_margin": chosen - rejected,
            "chosen_reward": chosen,
            "rejected_reward": rejected,
            "logp_acc": (policy_chosen > policy_rejected).double(),
        }[self.statistic]
        self.total += value.sum()
        self.count += value.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp_min(1.0)).float()


class DPO(CausalLM):
    """DPO: prefer ``chosen`` over ``rejected`` relative to a frozen reference, with no reward model.

    Examples are ``{"prompt", "chosen", "rejected"}``; both answers are encoded as causal-LM
    responses of the prompt (EOS appended, loss on response tokens only). The reference model is
    the frozen base: ``reference: adapter_disabled`` (default) runs the same model inside peft's
    ``disable_adapter()`` context, so no second model is held — it needs an HF-peft method (lora,
    ia3, prompt tuning, ...); ``reference: copy`` keeps a frozen copy of the base (twice the model
    memory), which ``full``/``bitfit``/``head`` need. The reference runs in eval mode (no dropout),
    as a frozen model would. Metrics on held-out pairs: ``reward_acc`` (fraction with
    r_chosen > r_rejected; 0 before training, when policy == reference), ``reward_margin``,
    ``chosen_reward``, ``rejected_reward`` and ``logp_acc`` (the policy's own likelihood prefers
    chosen; meaningful before training too). Generation samples use ``chosen`` as the reference.
    A merging aggregator (``fedex_lora``, ``flora``) folds updates into the base, and so into the
    ``adapter_disabled`` reference. ``cache_reference`` (default on) remembers each row's reference
    log-probability until the base changes, so validation rounds after the first cost one forward
    pass per answer instead of two.
    """

    name = "dpo"

    def __init__(
        self,
        model_name_or_path: str,
        beta: float = 0.1,
        reference: ReferenceMode = "adapter_disabled",
        gguf_file: str | None = None,
        max_length: int = 256,
        prompt_template: str = "{prompt}\n",
        use_chat_template: bool = False,
        max_new_tokens: int = 32,
        generate_max_examples: int = 16,
        num_samples: int = 3,
        generate_batch_size: int = 16,
        quantization: str | dict[str, Any] | None = None,
        cache_reference: bool = True,
    ) -> None:
        if beta <= 0:
            raise ValueError(f"dpo beta must be > 0, got {beta}")
        if reference not in ("adapter_disabled", "copy"):
            raise ValueError(f"dpo reference must be 'adapter_disabled' or 'copy', got {reference!r}")
        super().__init__(
            model_name_or_path, gguf_file, max_length, prompt_template, use_chat_template, max_new_tokens,
            generate_max_examples, num_samples, generate_batch_size, quantization,
        )  # fmt: skip
        self.beta = beta
        self.reference = reference
        self._reference_model: nn.Module | None = None
        self.cache_reference = cache_reference
        self._cache: dict[bytes, float] = {}
        self._cache_key: tuple[Any, ...] | None = None

    # --- the reference model ---------------------------------------------------------------------

    def build_model(self, num_classes: int = 0) -> nn.Module:
        model = super().build_model(num_classes)
        if self.reference == "copy":  # taken before any PEFT method or training touches the weights
            self._reference_model = copy.deepcopy(model).eval().requires_grad_(False)
        return model

    def check_model(self, model: nn.Module) -> None:
        if self.reference == "adapter_disabled" and not callable(getattr(model, "disable_adapter", None)):
            raise ValueError(
                "dpo reference 'adapter_disabled' needs an HF-peft method (lora, ia3, prompt_tuning, ...) whose "
                "adapter can be switched off; this PEFT method trains base weights, so set "
                "model.task.init_args.reference: copy (holds a frozen copy of the base: 2x model memory)"
            )

    @contextmanager
    def _reference_of(self, model: nn.Module):
        if self._reference_model is not None:
            device = next(model.parameters()).device
            yield self._reference_model.to(device)
            return
        assert isinstance(model, SwitchableAdapter), "check_model refuses reference 'adapter_disabled' without one"
        was_training = model.training
        model.eval()
        try:
            with model.disable_adapter():
                yield model
        finally:
            model.train(was_training)

    @torch.no_grad()
    def reference_logprobs(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Summed response log-probabilities of each row under the frozen reference."""
        with self._reference_of(model) as reference:
            return sequence_logprobs(reference, batch)[0]

    def _base_fingerprint(self, model: nn.Module) -> tuple[Any, ...]:
        """What the reference depends on: the frozen copy, or (adapter disabled) a checksum of the frozen tensors.

        Models with equal frozen tensors have the same reference, so clients' copies share entries. A
        merging aggregator folds updates into the base in place; the per-tensor float64 sums then
        change and :meth:`cached_reference_logprobs` starts over. A frozen copy never changes.
        Quantized tensors (subclasses) are skipped: nothing may merge into a quantized base
        (``core/compat.py`` refuses it).
        """
        if self._reference_model is not None:
            return (id(self._reference_model),)
        with torch.no_grad():
            sums = [
                p.detach().sum(dtype=torch.float64)
                for p in model.parameters()
                if not p.requires_grad and p.dtype.is_floating_point and type(p.detach()) is torch.Tensor
            ]
            checksum = torch.stack(sums).cpu().numpy().tobytes() if sums else b""
        return (checksum,)

    @torch.no_grad()
    def cached_reference_logprobs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`reference_logprobs`, remembered per row (its token ids and labels) while the base is unchanged.

        The reference is frozen and runs without dropout, so a pair scored again (every validation
        round, later local steps) needs no second forward pass; only rows not seen since the base
        last changed are computed, in one batch. Values agree with a fresh pass up to float
        rounding of a different padding width (~1e-6). Under ``torch.func.vmap`` (per-example
        DP-SGD gradients) rows have no readable values, so the reference is computed fresh.
        """
        try:
            lengths = batch["attention_mask"].sum(1).tolist()
            keys = [
                torch.cat([batch["input_ids"][i, :n], batch["labels"][i, :n]]).cpu().numpy().tobytes()
                for i, n in enumerate(lengths)
            ]
        except RuntimeError:  # inside torch.func.vmap (DP-SGD per-example grads): no values to key on
            return self.reference_logprobs(model, batch)
        fingerprint = self._base_fingerprint(model)
        if fingerprint != self._cache_key:
            self._cache, self._cache_key = {}, fingerprint
        missing = list({k: i for i, k in enumerate(keys) if k not in self._cache}.values())  # one row per key
        if missing:
            width = max(lengths[i] for i in missing)
            rows = torch.tensor(missing, device=batch["input_ids"].device)
            fresh = self.reference_logprobs(model, {k: v[rows, :width] for k, v in batch.items()})
            self._cache.update({keys[i]: float(v) for i, v in zip(missing, fresh.tolist())})
        device = batch["input_ids"].device
        return torch.tensor([self._cache[k] for k in keys], dtype=torch.float32, device=device)

    # --- Task interface ------------------------------------------------------------------------------

    def collate(self, examples: list[Example]) -> dict[str, Any]:
        """``chosen_*`` and ``rejected_*`` batches, one row per pair (so per-example DP-SGD splits keep pairs)."""
        out: dict[str, Any] = {}
        for side in ("chosen", "rejected"):
            rows = [self.encode_pair(str(e["prompt"]), str(e[side])) for e in examples]
            out.update({f"{side}_{k}": v for k, v in self.pad(rows).items()})
        return out

    @staticmethod
    def joint_batch(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Chosen rows then rejected rows, right-padded to one width: one forward pass for both."""
        width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
        fill = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}
        out = {}
        for key, value in fill.items():
            parts = [
                F.pad(batch[f"{side}_{key}"], (0, width - batch[f"{side}_{key}"].shape[1]), value=value)
                for side in ("chosen", "rejected")
            ]
            out[key] = torch.cat(parts)
        return out

    def step(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        n = batch["chosen_input_ids"].shape[0]
        joint = self.joint_batch(batch)
        policy, _ = sequence_logprobs(model, joint)
        score = self.cached_reference_logprobs if self.cache_reference else self.reference_logprobs
        reference = score(model, joint)
        loss, chosen, rejected = dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], self.beta)
        preds = torch.stack([chosen, rejected, policy[:n], policy[n:]], dim=1).detach()
        return StepOutput(loss, preds, torch.ones(n, device=preds.device))

    def metrics(self, num_classes: int = 0) -> MetricCollection:
        names = ("reward_acc", "reward_margin", "chosen_reward", "rejected_reward", "logp_acc")
        return MetricCollection({n: _PairMean(n) for n in names})

    def generate_eval(self, model: nn.Module, examples: list[Example]) -> GenerationEval:
        """Greedy generations with ``chosen`` as the reference answer (exact match, ROUGE-L)."""
        return super().generate_eval(
            model, [{"prompt": e["prompt"], "response": e.get("response", e["chosen"])} for e in examples]
        )


@hookimpl
def fedlight_tasks() -> list[type]:
    return [DPO]
