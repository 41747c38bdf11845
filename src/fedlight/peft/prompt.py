"""Soft-prompt methods through HF peft (transformers models only): prompt tuning, prefix tuning, P-tuning.

peft's prompt-learning models need a ``task_type``; it is inferred from the model: sequence
classifiers (``*ForSequenceClassification``) get ``SEQ_CLS`` -- peft then trains the classifier as a
``modules_to_save`` copy, which the ``head`` switch governs as for every other method -- and
causal LMs get ``CAUSAL_LM``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from torch import nn

from fedlight.hookspecs import hookimpl
from fedlight.peft.base import HeadMode
from fedlight.peft.peft_library import PeftLibraryMethod


class PromptLearning(PeftLibraryMethod):
    """Base of the prompt family: virtual tokens, task type from the model, no target modules."""

    families: ClassVar[frozenset[str]] = frozenset({"transformers"})

    def __init__(self, num_virtual_tokens: int = 20, head: HeadMode = "shared") -> None:
        super().__init__("attention", head)
        if num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {num_virtual_tokens}")
        self.num_virtual_tokens = num_virtual_tokens

    def resolve(self, model: nn.Module, head_modules: list[str]) -> None:
        return None

    def task_type(self, model: nn.Module) -> str:
        cls = type(model).__name__
        if cls.endswith("ForSequenceClassification"):
            return "SEQ_CLS"
        if cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel"):
            return "CAUSAL_LM"
        raise ValueError(
            f"PEFT method {self.name!r} supports sequence-classification and causal-LM transformers models, "
            f"not {cls}; use e.g. lora or ia3"
        )


class PromptTuning(PromptLearning):
    """Prompt tuning (Lester et al. 2021, arXiv:2104.08691): trained virtual-token embeddings prepended to the input."""

    name = "prompt_tuning"
    example_args = {"num_virtual_tokens": 4}
    config_class = "PromptTuningConfig"

    def config_kwargs(self, model, targets) -> dict[str, Any]:
        return dict(num_virtual_tokens=self.num_virtual_tokens, prompt_tuning_init="RANDOM")


class PrefixTuning(PromptLearning):
    """Prefix tuning (Li & Liang 2021, arXiv:2101.00190): trained key/value prefixes in every attention layer.

    ``projection_dim`` > 0 reparameterises the prefixes through a two-layer MLP of that width.
    """

    name = "prefix_tuning"
    example_args = {"num_virtual_tokens": 4}
    config_class = "PrefixTuningConfig"

    def __init__(self, num_virtual_tokens: int = 20, projection_dim: int = 0, head: HeadMode = "shared") -> None:
        super().__init__(num_virtual_tokens, head)
        if projection_dim < 0:
            raise ValueError(f"projection_dim must be >= 0, got {projection_dim}")
        self.projection_dim = projection_dim

    def prepare(self, model: nn.Module, head_modules: list[str]) -> nn.Module:
        import inspect

        params = inspect.signature(model.forward).parameters
        if type(model).__name__.endswith("ForSequenceClassification") and "past_key_values" not in params:
            raise ValueError(
                f"PEFT method {self.name!r} needs a model whose forward takes past_key_values (decoder LMs such as "
                f"GPT-2 or Llama); {type(model).__name__} does not in this transformers version -- use prompt_tuning or p_tuning"
            )
        return super().prepare(model, head_modules)

    def config_kwargs(self, model, targets) -> dict[str, Any]:
        extra = {"prefix_projection": True, "encoder_hidden_size": self.projection_dim} if self.projection_dim else {}
        return dict(num_virtual_tokens=self.num_virtual_tokens, **extra)


class PTuning(PromptLearning):
    """P-tuning (Liu et al. 2021, arXiv:2103.10385): virtual-token embeddings produced by a trained prompt encoder."""

    name = "p_tuning"
    example_args = {"num_virtual_tokens": 4, "encoder_hidden_size": 8}
    config_class = "PromptEncoderConfig"

    def __init__(
        self,
        num_virtual_tokens: int = 20,
        encoder_hidden_size: int = 128,
        encoder: Literal["MLP", "LSTM"] = "MLP",
        head: HeadMode = "shared",
    ) -> None:
        super().__init__(num_virtual_tokens, head)
        if encoder_hidden_size < 1:
            raise ValueError(f"encoder_hidden_size must be >= 1, got {encoder_hidden_size}")
        self.encoder_hidden_size, self.encoder = encoder_hidden_size, encoder

    def config_kwargs(self, model, targets) -> dict[str, Any]:
        return dict(
            num_virtual_tokens=self.num_virtual_tokens, encoder_hidden_size=self.encoder_hidden_size,
            encoder_reparameterization_type=self.encoder,
        )  # fmt: skip


@hookimpl
def fedlight_peft_methods() -> list[type]:
    return [PromptTuning, PrefixTuning, PTuning]
