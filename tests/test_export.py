"""Exported adapters load in a fresh process with plain transformers / peft / timm and give the same logits."""

from __future__ import annotations

import copy
import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TINY_VIT, run_fit, text_config, vision_config
from safetensors.torch import load_file, save_file
from torch import nn

from fedlight.core.export import ADAPTER_JSON, TRAINABLE_FILE, export_adapter, load_adapter

ONE_ROUND = {"rounds": 1, "clients_per_round": 2, "local_steps": 2, "checkpoint_every": 0}
SENTENCES = ["how are you today?", "¿dónde está la biblioteca?", "come stai oggi, amico mio?", "hello"]


def run_fresh(code: str, cwd: Path) -> str:
    """Run ``code`` in a new interpreter (nothing of this process's state leaks); fail on a non-zero exit."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@torch.no_grad()
def _logits(model, **inputs) -> torch.Tensor:
    was = model.training
    model.eval()
    out = model(**inputs)
    model.train(was)
    return (out.logits if hasattr(out, "logits") else out).detach().clone()


def test_lora_text_adapter_and_merged_model_load_with_plain_peft_and_transformers(tiny_bert_dir, tmp_path):
    cli = run_fit(text_config(tiny_bert_dir, tmp_path, federation=ONE_ROUND), tmp_path)
    module = cli.model
    out = export_adapter(module, tmp_path / "adapter", merged=True)
    info = json.loads((out / ADAPTER_JSON).read_text())
    assert info["layout"] == "peft" and info["method"] == "lora"
    assert info["base"]["model_name_or_path"] == str(tiny_bert_dir)
    # the head travels in the adapter (peft's modules_to_save): a freshly built base has a random classifier
    adapter_keys = list(load_file(str(out / "adapter_model.safetensors")))
    assert any("classifier" in k for k in adapter_keys) and any("lora_A" in k for k in adapter_keys)
    assert not any("word_embeddings" in k for k in adapter_keys)  # no frozen tensor in the adapter

    enc = module.task.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    expected = _logits(module.model, **inputs)
    save_file({**inputs, "logits": expected}, str(tmp_path / "expected.safetensors"))
    assert module.model.training  # export left the trained module as it was

    stdout = run_fresh(
        f"""
        import json, torch
        from safetensors.torch import load_file
        from transformers import AutoModelForSequenceClassification
        from peft import PeftModel
        d = load_file({str(tmp_path / "expected.safetensors")!r})
        inputs = {{k: d[k] for k in ("input_ids", "attention_mask", "token_type_ids")}}
        info = json.load(open({str(out / ADAPTER_JSON)!r}))
        torch.manual_seed(123)  # any seed: the classifier comes from the adapter, not from the init
        base = AutoModelForSequenceClassification.from_pretrained(
            info["base"]["model_name_or_path"], num_labels=info["num_classes"], local_files_only=True)
        model = PeftModel.from_pretrained(base, {str(out)!r}).eval()
        with torch.no_grad():
            got = model(**inputs).logits
        assert torch.allclose(got, d["logits"], atol=1e-5), (got - d["logits"]).abs().max()
        merged = AutoModelForSequenceClassification.from_pretrained({str(out / "merged")!r}, local_files_only=True).eval()
        assert not any("lora" in n for n, _ in merged.named_parameters())
        with torch.no_grad():
            got = merged(**inputs).logits
        assert torch.allclose(got, d["logits"], atol=1e-5), (got - d["logits"]).abs().max()
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(out / "merged")!r})
        assert torch.equal(tok({SENTENCES!r}, padding=True, return_tensors="pt")["input_ids"], inputs["input_ids"])
        print("ok", "fedlight" in __import__("sys").modules)
        """,
        tmp_path,
    )
    assert stdout.split() == ["ok", "False"]  # plain libraries only


def _images() -> torch.Tensor:
    return torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_lora_timm_merged_model_loads_with_plain_timm(tmp_path):
    cli = run_fit(vision_config(tmp_path, federation=ONE_ROUND), tmp_path)
    module = cli.model
    out = export_adapter(module, tmp_path / "adapter", merged=True)
    info = json.loads((out / ADAPTER_JSON).read_text())
    assert info["merged"] == {"dir": "merged", "layout": "timm"}
    images = _images()
    save_file({"images": images, "logits": _logits(module.model, x=images)}, str(tmp_path / "expected.safetensors"))

    run_fresh(
        f"""
        import json, timm, torch
        from safetensors.torch import load_file
        d = load_file({str(tmp_path / "expected.safetensors")!r})
        cfg = json.load(open({str(out / "merged" / "config.json")!r}))
        model = timm.create_model(cfg["architecture"], pretrained=False, num_classes=cfg["num_classes"], **cfg["model_args"])
        model.load_state_dict(load_file({str(out / "merged" / "model.safetensors")!r}))  # strict
        with torch.no_grad():
            got = model.eval()(d["images"])
        assert torch.allclose(got, d["logits"], atol=1e-5), (got - d["logits"]).abs().max()
        local = timm.create_model("local-dir:" + {str(out / "merged")!r}, pretrained=True).eval()
        with torch.no_grad():
            got = local(d["images"])
        assert torch.allclose(got, d["logits"], atol=1e-5), (got - d["logits"]).abs().max()
        """,
        tmp_path,
    )


def test_bitfit_timm_adapter_loads_with_load_adapter(tmp_path):
    import timm

    kwargs = TINY_VIT["init_args"]["model_kwargs"]
    torch.manual_seed(7)
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **kwargs)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    task = {**TINY_VIT, "init_args": {**TINY_VIT["init_args"], "checkpoint_path": str(tmp_path / "base.safetensors")}}
    cfg = vision_config(tmp_path, model={"task": task, "peft": {"class_path": "bitfit"}}, federation=ONE_ROUND)
    module = run_fit(cfg, tmp_path).model
    out = export_adapter(module, tmp_path / "adapter", merged=True)  # merged: nothing to merge for bitfit
    info = json.loads((out / ADAPTER_JSON).read_text())
    assert info["layout"] == "fedlight" and info["files"] == [TRAINABLE_FILE] and not (out / "merged").exists()
    saved = load_file(str(out / TRAINABLE_FILE))
    assert set(saved) == set(info["tensors"]) == set(module.shared_names)
    assert all(n.endswith("bias") or n.startswith("head.") for n in saved)
    images = _images()
    save_file({"images": images, "logits": _logits(module.model, x=images)}, str(tmp_path / "expected.safetensors"))

    run_fresh(
        f"""
        import json, timm, torch
        from safetensors.torch import load_file
        from fedlight.core.export import load_adapter
        d = load_file({str(tmp_path / "expected.safetensors")!r})
        info = json.load(open({str(out / ADAPTER_JSON)!r}))
        b = info["base"]
        model = timm.create_model(b["architecture"], pretrained=False, num_classes=info["num_classes"], **b["model_args"])
        model.load_state_dict(load_file(b["checkpoint_path"]))
        before = model(d["images"])
        model = load_adapter(model, {str(out)!r}).eval()
        with torch.no_grad():
            got = model(d["images"])
        assert torch.allclose(got, d["logits"], atol=1e-5), (got - d["logits"]).abs().max()
        assert not torch.allclose(before, d["logits"], atol=1e-3)  # the adapter is what made the difference
        """,
        tmp_path,
    )


@pytest.mark.parametrize("method", ["head", "full"])
def test_own_method_text_adapter_roundtrip_in_process(method, tiny_bert_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    cfg = text_config(tiny_bert_dir, tmp_path, model={"peft": {"class_path": method}}, federation=ONE_ROUND)
    module = run_fit(cfg, tmp_path).model
    out = export_adapter(module, tmp_path / "adapter")
    enc = module.task.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    expected = _logits(module.model, **enc)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=module.num_classes)
    got = _logits(load_adapter(base, out), **enc)
    assert torch.allclose(got, expected, atol=1e-5)


def test_load_adapter_refuses_a_mismatched_base(tmp_path):
    import timm

    save_file({"head.weight": torch.zeros(3, 32)}, str(tmp_path / TRAINABLE_FILE))
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **TINY_VIT["init_args"]["model_kwargs"])
    with pytest.raises(ValueError, match="head.weight"):
        load_adapter(model, tmp_path)
    save_file({"nope.weight": torch.zeros(3)}, str(tmp_path / TRAINABLE_FILE))
    with pytest.raises(KeyError, match="nope.weight"):
        load_adapter(model, tmp_path)
    with pytest.raises(FileNotFoundError):
        load_adapter(model, tmp_path / "missing")


# --- merging aggregators: the adapter on the original base is the global model -------------------


def test_round_exports_of_merging_and_plain_aggregators_load_the_readme_way(tiny_bert_dir, tmp_path):
    """FedEx-LoRA / FLoRA change the frozen base; the exported adapter carries that change (fedavg: control).

    Loaded in a fresh process exactly as the README says (plain peft on the original base), each
    export gives the global model's logits; so do peft's ``merge_and_unload`` and the merged export.
    """
    fed = {"rounds": 2, "clients_per_round": 2, "local_steps": 3, "checkpoint_every": 0, "export_every": 2}
    exports = {}
    for aggregator in ("fedex_lora", "flora", "fedavg"):
        run = tmp_path / aggregator
        cfg = text_config(tiny_bert_dir, run, federation={**fed, "aggregator": aggregator, "export_merged": True})
        module = run_fit(cfg, run).model
        (out,) = list((run / "runs").rglob("adapters/round-0002"))
        info = read_json(out)
        merging = aggregator != "fedavg"
        assert bool(module.kept_frozen) == merging and ("merged_base" in info) == merging
        if merging:  # every merged layer is folded in, and only those
            assert {f"base_model.model.{k}.base_layer.weight" for k in info["merged_base"]["layers"]} == module.kept_frozen
        enc = module.task.tokenizer(SENTENCES, padding=True, return_tensors="pt")
        inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        save_file({**inputs, "logits": _logits(module.model, **inputs)}, str(run / "expected.safetensors"))
        exports[aggregator] = (str(out), str(run / "expected.safetensors"))
    stdout = run_fresh(
        f"""
        import json, torch
        from safetensors.torch import load_file
        from transformers import AutoModelForSequenceClassification
        from peft import PeftModel
        for name, (out, expected) in {exports!r}.items():
            d = load_file(expected)
            inputs = {{k: d[k] for k in ("input_ids", "attention_mask", "token_type_ids")}}
            info = json.load(open(out + "/fedlight_adapter.json"))
            def base():
                return AutoModelForSequenceClassification.from_pretrained(
                    info["base"]["model_name_or_path"], num_labels=info["num_classes"], local_files_only=True)
            with torch.no_grad():
                adapter = PeftModel.from_pretrained(base(), out).eval()
                got = adapter(**inputs).logits
                folded = adapter.merge_and_unload()(**inputs).logits  # peft's own merge agrees
                merged = AutoModelForSequenceClassification.from_pretrained(out + "/merged").eval()(**inputs).logits
                original = base().eval()(**inputs).logits
            for kind, value in (("adapter", got), ("merge_and_unload", folded), ("merged", merged)):
                assert torch.allclose(value, d["logits"], atol=1e-5), (name, kind, (value - d["logits"]).abs().max())
            print(name, (got - d["logits"]).abs().max().item(), (original - d["logits"]).abs().max().item())
        """,
        tmp_path,
    )
    for line in stdout.splitlines():
        _, diff, untrained = line.split()
        assert float(diff) <= 1e-5 < float(untrained), line  # the export is the global model, which is not the base
    assert len(stdout.splitlines()) == 3


def test_export_refuses_a_merged_module_without_its_base_change(tiny_bert_dir, tmp_path):
    fed = {"rounds": 1, "clients_per_round": 2, "local_steps": 2, "checkpoint_every": 0, "aggregator": "fedex_lora"}
    module = run_fit(text_config(tiny_bert_dir, tmp_path, federation=fed), tmp_path).model
    assert module.kept_frozen
    export_adapter(module, tmp_path / "found")  # the change is found on the trainer's federation callback
    assert "merged_base" in read_json(tmp_path / "found")
    module.trainer = None  # detached: nothing says how the base changed
    with pytest.raises(ValueError, match="base_delta"):
        export_adapter(module, tmp_path / "refused")
    assert not (tmp_path / "refused").exists() and not list(tmp_path.glob("refused*"))


def read_json(out: Path) -> dict:
    return json.loads((out / ADAPTER_JSON).read_text())


def _fuzz_case(rng: torch.Generator, case: int):
    """A random stack of LoRA-adapted layers (nn.Linear or GPT-2 Conv1D), ranks, scalings and base changes."""
    from transformers.pytorch_utils import Conv1D

    conv = case % 3 == 2
    sizes = [int(torch.randint(1, 9, (1,), generator=rng)) for _ in range(4)]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            make = (lambda i, o: Conv1D(o, i)) if conv else nn.Linear
            self.layers = nn.ModuleList(make(i, o) for i, o in itertools.pairwise(sizes))

        def forward(self, x):
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return x

    return Net, sizes, conv


@pytest.mark.parametrize("case", range(24))
def test_folded_base_change_is_exact_for_generated_layers(case, tmp_path):
    """Seeded: shapes in <= out and in > out, Linear and Conv1D (fan_in_fan_out), rsLoRA, some layers unmerged."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from fedlight.core.export import _fold_base_delta

    rng = torch.Generator().manual_seed(1000 + case)
    Net, sizes, conv = _fuzz_case(rng, case)
    torch.manual_seed(case)
    original = Net()
    r = int(torch.randint(1, 4, (1,), generator=rng))
    config = LoraConfig(
        r=r, lora_alpha=float(torch.randint(1, 17, (1,), generator=rng)), target_modules=["0", "1", "2"],
        use_rslora=bool(case % 2), fan_in_fan_out=conv, lora_dropout=0.1,
    )  # fmt: skip
    model = get_peft_model(copy.deepcopy(original), config)
    params = dict(model.named_parameters())
    base_delta = {}
    for i in range(3):
        prefix = f"base_model.model.layers.{i}"
        for which in ("lora_A", "lora_B"):
            w = params[f"{prefix}.{which}.default.weight"]
            w.data = torch.randn(w.shape, generator=rng)
        if i == case % 4:  # this layer's base was never merged into
            continue
        weight = params[f"{prefix}.base_layer.weight"]
        delta = torch.randn(weight.shape, generator=rng) * 0.3
        weight.data += delta  # what MergeIntoBase does in place
        base_delta[f"{prefix}.base_layer.weight"] = delta
    model.eval()
    x = torch.randn(7, sizes[0], generator=rng)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(str(tmp_path))
    folded = _fold_base_delta(model, tmp_path, base_delta)
    assert sorted(folded) == sorted(k.removeprefix("base_model.model.").removesuffix(".base_layer.weight") for k in base_delta)
    loaded = PeftModel.from_pretrained(copy.deepcopy(original), str(tmp_path)).eval()
    with torch.no_grad():
        got = loaded(x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (got - expected).abs().max()
    adapter_cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    for key in folded:  # full rank, scaling exactly 1
        module = loaded.get_submodule(f"base_model.model.{key}")
        assert module.r["default"] == adapter_cfg["rank_pattern"][key] == min(module.in_features, module.out_features)
        assert module.scaling["default"] == 1.0
