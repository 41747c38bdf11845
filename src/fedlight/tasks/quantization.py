"""``quantization:`` on the transformers tasks: a frozen 8/4-bit base under LoRA (QLoRA-style).

The base is quantized while transformers loads it (``quantization_config``); peft puts LoRA layers on the
quantized linears (torchao and bitsandbytes layers alike), the base stays frozen and never travels: only
adapters and the task head are exchanged. Methods:

* ``int8_weight_only`` — torchao int8 weights, per-channel scales, activations in float (runs on CPU and CUDA);
* ``nf4`` / ``fp4`` — bitsandbytes 4-bit (QLoRA's NF4), CUDA only; ``compute_dtype`` and ``double_quant`` apply;
* ``int8`` — bitsandbytes LLM.int8(), CUDA only.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

TORCHAO_METHODS = ("int8_weight_only",)
BNB_METHODS = ("nf4", "fp4", "int8")
METHODS = TORCHAO_METHODS + BNB_METHODS
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Quantization:
    method: str
    compute_dtype: str = "bfloat16"
    double_quant: bool = True

    @property
    def backend(self) -> str:
        return "torchao" if self.method in TORCHAO_METHODS else "bitsandbytes"

    def transformers_config(self, keep: list[str]) -> Any:
        """transformers' ``quantization_config``; ``keep`` names modules left in float (the new task head)."""
        if self.backend == "torchao":
            from torchao.quantization import Int8WeightOnlyConfig
            from transformers import TorchAoConfig

            return TorchAoConfig(quant_type=Int8WeightOnlyConfig(), modules_to_not_convert=keep or None)
        from transformers import BitsAndBytesConfig

        if self.method == "int8":
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep or None)
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=self.method, bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=_DTYPES[self.compute_dtype], llm_int8_skip_modules=keep or None,
        )  # fmt: skip

    def load_kwargs(self, keep: list[str]) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments: bitsandbytes quantizes while placing weights on the GPU."""
        kwargs: dict[str, Any] = {"quantization_config": self.transformers_config(keep)}
        if self.backend == "bitsandbytes":
            kwargs["device_map"] = {"": torch.cuda.current_device()}
        return kwargs


def parse_quantization(
    value: str | dict[str, Any] | None, field: str = "model.task.init_args.quantization"
) -> Quantization | None:
    """Validate ``quantization`` now, before any data or model is loaded: method, backend installed, CUDA."""
    if value is None or value in ("none", ""):
        return None
    spec = {"method": value} if isinstance(value, str) else dict(value)
    unknown = set(spec) - {"method", "compute_dtype", "double_quant"}
    if unknown:
        raise ValueError(f"{field}: unknown keys {sorted(unknown)}; allowed: method, compute_dtype, double_quant")
    method = spec.get("method")
    if method not in METHODS:
        raise ValueError(f"{field}: method must be one of {list(METHODS)}, got {method!r}")
    if spec.get("compute_dtype", "bfloat16") not in _DTYPES:
        raise ValueError(f"{field}: compute_dtype must be one of {list(_DTYPES)}, got {spec['compute_dtype']!r}")
    q = Quantization(**spec)
    if q.backend == "torchao" and importlib.util.find_spec("torchao") is None:
        raise ValueError(f"{field}: {method!r} needs torchao: pip install 'fedlight[quantization]' (or torchao)")
    if q.backend == "bitsandbytes":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{field}: {method!r} is bitsandbytes quantization, which needs a CUDA GPU and this machine has none; "
                "use int8_weight_only (torchao, runs on CPU) or drop quantization"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(f"{field}: {method!r} needs bitsandbytes: pip install bitsandbytes")
    return q
