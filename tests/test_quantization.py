"""A torchao int8 frozen base under LoRA: only adapters travel, the base stays bit-identical, bad combos are refused."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_fit, text_config

from fedlight.core.quantized import is_quantized, tensor_bytes
from fedlight.tasks.quantization import parse_quantization

pytest.importorskip("torchao")
Q = {"model": {"task": {"init_args": {"quantization": "int8_weight_only"}}}}


def quantized_state(model: torch.nn.Module) -> dict[str, list[torch.Tensor]]:
    out = {}
    for name, p in model.named_parameters():
        if is_quantized(p):
            inner_names, _ = p.__tensor_flatten__()
            out[name] = [getattr(p, n).clone() for n in inner_names]
    return out


def test_lora_on_int8_base_ships_only_adapters_and_leaves_the_base_bit_identical(tiny_bert_dir, tmp_path):
    from fedlight.tasks.text_classification import TextClassification

    cli = run_fit(text_config(tiny_bert_dir, tmp_path, **Q), tmp_path)
    module = cli.model
    shared = module.shared_names
    assert shared and all(".lora_" in n or ".classifier." in n for n in shared), shared
    trained = quantized_state(module.model)
    assert len(trained) == 13  # q, k, v, attention-out, intermediate, output of 2 layers + pooler
    fresh = TextClassification(str(tiny_bert_dir), quantization="int8_weight_only").build_model(3)
    reference = quantized_state(fresh)
    for name, inner in trained.items():
        ref = reference[name.removeprefix("base_model.model.").replace(".base_layer", "")]
        assert all(torch.equal(a, b) for a, b in zip(inner, ref)), name
    manifest = json.loads(next(tmp_path.rglob("manifest.json")).read_text())
    base = manifest["base"]
    assert base["quantization"] == "int8_weight_only" and base["quantized_tensors"] == 13
    # exact: each int8 weight holds out*in bytes + a float32 scale and an int8 zero point per row, not 4*out*in
    saved = 0
    for _, p in fresh.named_parameters():
        if is_quantized(p):
            out_f, in_f = p.shape
            assert tensor_bytes(p) == out_f * in_f + 4 * out_f + out_f  # int8 data, fp32 scale, int8 zero point
            saved += 4 * out_f * in_f - tensor_bytes(p)
    assert base["fp32_bytes"] - base["bytes"] == saved
    assert all(not t["name"].endswith(".base_layer.weight") for t in manifest["shared"]["tensors"])


@pytest.mark.parametrize(
    "section, key, value, match",
    [
        ("model", "peft", {"class_path": "full"}, "trains 13 quantized base tensors"),
        ("federation", "aggregator", {"class_path": "fedex_lora"}, "merges updates into the frozen base"),
    ],
)
def test_impossible_combinations_are_refused_before_round_one(tiny_bert_dir, tmp_path, section, key, value, match):
    cfg = text_config(tiny_bert_dir, tmp_path, **Q)
    cfg[section][key] = value
    with pytest.raises(Exception, match=match):
        run_fit(cfg, tmp_path)
    assert not list(tmp_path.rglob("rounds.csv"))  # refused before any round was written


def test_bitfit_on_a_quantized_base_trains_float_biases_only(tiny_bert_dir):
    from fedlight.core import compat
    from fedlight.peft.bitfit import BitFit
    from fedlight.tasks.text_classification import TextClassification

    task = TextClassification(str(tiny_bert_dir), quantization="int8_weight_only")
    model = task.build_model(3)
    peft = BitFit()
    model = peft.apply(model, task.family, task.head_modules(model))
    compat.check_model(task, peft, model)  # biases are float: allowed
    assert not any(is_quantized(p) for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "value, match",
    [
        ("int4", "method must be one of"),
        ({"method": "nf4", "bits": 4}, "unknown keys"),
        ({"method": "int8_weight_only", "compute_dtype": "int8"}, "compute_dtype"),
    ],
)
def test_bad_quantization_values_name_the_option(value, match):
    with pytest.raises(ValueError, match=match):
        parse_quantization(value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only refusal")
@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
def test_bitsandbytes_is_refused_without_cuda(method):
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        parse_quantization({"method": method})


def test_quantization_excludes_gguf(tiny_gpt2_dir):
    from fedlight.tasks.causal_lm import CausalLM

    with pytest.raises(ValueError, match="exclude each other"):
        CausalLM(str(tiny_gpt2_dir), gguf_file="x.gguf", quantization="int8_weight_only")
