"""Export the trained global model as a deployable adapter (or a merged model).

Layouts written by :func:`export_adapter` into ``out_dir``:

* **HF-peft methods** (``lora`` and other methods whose model is a ``peft.PeftModel``):
  ``adapter_config.json`` + ``adapter_model.safetensors`` from ``PeftModel.save_pretrained`` (the adapter
  factors and the trained head, peft's ``modules_to_save``), loadable with
  ``peft.PeftModel.from_pretrained(base, out_dir)``. With ``merged=True`` also ``out_dir/merged/``: the
  adapter merged into a copy of the base (``merge_and_unload``) — a transformers model directory
  (``save_pretrained``, plus the task's tokenizer) or, for timm, ``model.safetensors`` + a timm-style
  ``config.json`` (``architecture``, ``num_classes``, ``model_args``), loadable with
  ``timm.create_model(arch, num_classes=..., **model_args)`` + ``load_state_dict`` or with
  ``timm.create_model("local-dir:" + path)``.
* **fedlight's own methods** (``head``, ``bitfit``, ``full``): ``trainable.safetensors`` (every trainable
  tensor, by its name in the base model) — load it with :func:`load_adapter`.

Every export also writes ``fedlight_adapter.json``: method, task, base model (path, or timm
architecture/kwargs/checkpoint), number of classes and the tensor names. Nothing here pickles.

**Merging aggregators** (``fedex_lora``, ``flora``) change the frozen weights of every LoRA layer,
so the global model is ``W0 + ΔW_base + s·B·A`` and a rank-r adapter on the original base ``W0`` is
not it. For those layers the export writes the layer's whole change ``D = ΔW_base + s·B·A`` as an
exact full-rank LoRA pair (``r = min(in, out)``, scaling 1, one factor the identity; declared in
peft's own ``rank_pattern`` / ``alpha_pattern``), so plain ``PeftModel.from_pretrained(base, dir)``
on the original base gives the global model. ``fedlight_adapter.json`` lists them under
``merged_base``. The adapter is then about as large as those layers' weights.

An export is built in ``<out_dir>.tmp`` and swapped in complete (an old export of the same round is
replaced only then); a disk failure is a :class:`~fedlight.errors.StorageError` naming the path.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedlight.core.storage import atomic_dir

if TYPE_CHECKING:
    from peft import PeftModel

ADAPTER_JSON = "fedlight_adapter.json"
TRAINABLE_FILE = "trainable.safetensors"
MERGED_DIR = "merged"
FORMAT = "fedlight-adapter"
FORMAT_VERSION = 1


def _is_peft_model(model: nn.Module) -> TypeGuard[PeftModel]:
    try:
        import peft
    except ImportError:  # pragma: no cover - peft is a core dependency
        return False
    return isinstance(model, peft.PeftModel)


def _is_transformers_model(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def base_description(module) -> dict[str, Any]:
    """How to rebuild the frozen base: a transformers path, or a timm architecture and its arguments."""
    task = module.task
    out: dict[str, Any] = {"task": getattr(task, "name", type(task).__name__), "family": getattr(task, "family", "")}
    if getattr(task, "family", "") == "timm":
        out.update(
            architecture=task.model_name,
            model_args={"in_chans": task.in_chans, **task.model_kwargs},
            checkpoint_path=str(task.checkpoint_path) if task.checkpoint_path else None,
        )
    else:
        path = getattr(task, "path", None)
        out["model_name_or_path"] = str(path) if path is not None else None
    return out


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _save_timm(model: nn.Module, out_dir: Path, module) -> None:
    """``model.safetensors`` + a timm ``config.json`` (the layout ``timm.create_model('local-dir:...')`` reads)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(_contiguous(model.state_dict()), str(out_dir / "model.safetensors"))
    task = module.task
    pretrained_cfg = {
        k: v
        for k, v in dict(getattr(model, "pretrained_cfg", {}) or {}).items()
        if isinstance(v, (str, int, float, bool, list, tuple, type(None)))
    }
    pretrained_cfg.update(num_classes=module.num_classes, input_size=[task.in_chans, *_image_size(task, model)])
    config = {
        "architecture": task.model_name,
        "num_classes": module.num_classes,
        "num_features": getattr(model, "num_features", None),
        "model_args": {"in_chans": task.in_chans, **task.model_kwargs},
        "pretrained_cfg": pretrained_cfg,
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=1) + "\n")


def _image_size(task, model: nn.Module) -> list[int]:
    if task.image_size:
        return [task.image_size, task.image_size]
    size = dict(getattr(model, "pretrained_cfg", {}) or {}).get("input_size")
    return list(size[1:]) if size else [224, 224]


def _write_json(out_dir: Path, info: dict[str, Any]) -> None:
    (out_dir / ADAPTER_JSON).write_text(json.dumps(info, indent=1) + "\n")


def _merged_base_delta(module, base_delta: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The cumulative change a merging aggregator made to the frozen weights (``{}`` if none).

    ``module.kept_frozen`` names the changed weights; their change is passed in, or found on the
    trainer's federation callback (``base_total``). Refuses rather than export a silently wrong adapter.
    """
    changed = set(getattr(module, "kept_frozen", ()) or ())
    if base_delta is None and changed:
        try:
            callbacks = module.trainer.callbacks  # attached by Lightning during and after fit
        except RuntimeError:
            callbacks = []
        for callback in callbacks:
            total = getattr(callback, "base_total", None)
            if isinstance(total, dict) and set(total) == changed:
                base_delta = total
                break
    base_delta = dict(base_delta or {})
    if set(base_delta) != changed and changed:
        raise ValueError(
            f"a merging aggregator changed the frozen weights {sorted(changed)[:3]}: pass their cumulative change "
            "as export_adapter(..., base_delta=...) (the federation callback's base_total), or export with "
            "federation.export_every, which does"
        )
    return base_delta


def _fold_base_delta(model: PeftModel, out_dir: Path, base_delta: dict[str, torch.Tensor]) -> list[str]:
    """Rewrite the saved peft adapter so each LoRA layer with a merged base change carries all of it.

    The layer's whole change to the original weight, ``D = ΔW_base + s·B·A`` (``out × in``), becomes
    the pair ``B' = D, A' = I`` (or ``B' = I, A' = D`` when ``out < in``) with rank ``min(in, out)``
    and scaling 1 (``lora_alpha = r``, or ``sqrt(r)`` with rsLoRA): exact, and plain peft loads it.
    """
    from peft.tuners.lora.layer import LoraLayer
    from peft.utils.other import get_pattern_key

    adapter = model.active_adapter
    config_path, weights_path = out_dir / "adapter_config.json", out_dir / "adapter_model.safetensors"
    config = json.loads(config_path.read_text())
    saved = load_file(str(weights_path))
    rank_pattern, alpha_pattern, folded = {}, {}, []
    prefix = "base_model.model."
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}
    by_weight = {f"{n}.base_layer.weight": n for n in layers}
    unknown = sorted(set(base_delta) - set(by_weight))
    if unknown:
        raise ValueError(
            f"merged base weights {unknown[:3]} belong to no LoRA layer: they cannot be exported as an adapter"
        )
    for weight_name, delta in base_delta.items():
        name = by_weight[weight_name]
        layer = layers[name]
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), "LoRA factors are parameters"
        delta = delta.detach().to("cpu", torch.float64)
        # peft's Linear and Embedding LoRA layers set it; GPT-2's Conv1D stores its weight as (in, out)
        if getattr(layer, "fan_in_fan_out", False):
            delta = delta.T
        change = delta + float(layer.scaling[adapter]) * (b.detach().cpu().double() @ a.detach().cpu().double())
        out_features, in_features = change.shape
        rank = min(out_features, in_features)
        eye = torch.eye(rank, dtype=torch.float64)
        new_b, new_a = (change, eye) if in_features <= out_features else (eye, change)
        key = name.removeprefix(prefix)
        saved[f"{name}.lora_A.weight"] = new_a.to(a.dtype).contiguous()
        saved[f"{name}.lora_B.weight"] = new_b.to(b.dtype).contiguous()
        rank_pattern[key] = rank
        alpha_pattern[key] = math.sqrt(rank) if config.get("use_rslora") else rank
        folded.append(key)
    # our patterns go first and must each pick exactly their own layer under peft's own matching
    rank_pattern = {**rank_pattern, **(config.get("rank_pattern") or {})}
    alpha_pattern = {**alpha_pattern, **(config.get("alpha_pattern") or {})}
    for name in layers:
        key = name.removeprefix(prefix)
        hit = get_pattern_key(list(rank_pattern), key)
        if (hit in folded) != (key in folded) or (key in folded and hit != key):
            raise ValueError(f"cannot address LoRA layer {key} uniquely in peft's rank_pattern")
    config.update(rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    save_file(saved, str(weights_path), metadata={"format": "pt"})
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folded


def export_adapter(
    module, out_dir: str | Path, merged: bool = False, base_delta: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write the module's current (global) trainable state as an adapter into ``out_dir``; returns it.

    ``module`` is a built FederatedModule; call this between rounds or after ``fit``, when the model
    holds the aggregated global state. ``merged=True`` additionally writes ``out_dir/merged/`` for
    HF-peft methods (a standalone model with the adapter folded in; the trained module is untouched).
    For fedlight's own methods the trainable tensors already are plain base-model tensors, so
    ``merged`` has nothing to add and only the adapter is written.

    ``base_delta``: the cumulative change a merging aggregator (``fedex_lora``, ``flora``) made to
    frozen weights (``FederatedRound.base_total``; found on the trainer when omitted). It is folded
    into the adapter so that loading it on the original base gives the global model (module docstring).

    Tensors a method keeps on the clients (``head: local``) are exported with the values the global
    model holds (their initial values): a personalised client's own tensors are not part of a global export.
    """
    if module.model is None:
        raise ValueError("the module has no model yet: build it (or run fit) before exporting")
    base_delta = _merged_base_delta(module, base_delta)
    if base_delta and not _is_peft_model(module.model):
        raise ValueError("merged base weights can only be exported with an HF-peft LoRA adapter")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        _export_into(module, tmp, merged, base_delta)
    return out_dir


def _export_into(module, out_dir: Path, merged: bool, base_delta: dict[str, torch.Tensor]) -> None:
    model, peft_method = module.model, module.peft
    info: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "method": getattr(peft_method, "name", type(peft_method).__name__),
        "head": getattr(peft_method, "head", None),
        "num_classes": module.num_classes,
        "base": base_description(module),
        "shared": list(module.shared_names),
        "local": list(module.local_names),
    }
    if _is_peft_model(model):
        model.save_pretrained(str(out_dir))
        info["layout"] = "peft"
        info["files"] = ["adapter_config.json", "adapter_model.safetensors"]
        if base_delta:
            layers = _fold_base_delta(model, out_dir, base_delta)
            info["merged_base"] = {
                "layers": layers,
                "note": "these layers carry their whole change to the original base (merging aggregator) "
                "as a full-rank LoRA pair: load the adapter on the original base",
            }
        if merged:
            merged_dir = out_dir / MERGED_DIR
            plain = copy.deepcopy(model).merge_and_unload()  # the trained module stays as it is
            plain.eval()
            if _is_transformers_model(plain):
                plain.save_pretrained(str(merged_dir))
                tokenizer = getattr(module.task, "tokenizer", None)
                if tokenizer is not None:
                    tokenizer.save_pretrained(str(merged_dir))
                info["merged"] = {"dir": MERGED_DIR, "layout": "transformers"}
            elif info["base"]["family"] == "timm":
                _save_timm(plain, merged_dir, module)
                info["merged"] = {"dir": MERGED_DIR, "layout": "timm"}
            else:
                merged_dir.mkdir(parents=True, exist_ok=True)
                save_file(_contiguous(plain.state_dict()), str(merged_dir / "model.safetensors"))
                info["merged"] = {"dir": MERGED_DIR, "layout": "state_dict"}
    else:
        names = module.peft.trainable_names(model)
        save_file(_contiguous(module.peft.get_state(model, names)), str(out_dir / TRAINABLE_FILE))
        info["layout"] = "fedlight"
        info["files"] = [TRAINABLE_FILE]
        info["tensors"] = names
    _write_json(out_dir, info)


def read_adapter_info(adapter_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(adapter_dir) / ADAPTER_JSON).read_text())


def load_adapter(base_model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Load an exported adapter into a freshly built base model and return the model to use.

    * fedlight layout (``head``, ``bitfit``, ``full``): copies ``trainable.safetensors`` into
      ``base_model`` in place (every tensor must exist with the same shape) and returns it;
    * peft layout (``lora``, ...): returns ``peft.PeftModel.from_pretrained(base_model, adapter_dir)``.

    The base must be the one the run started from: the same transformers directory with
    ``num_labels=info['num_classes']``, or ``timm.create_model(architecture, num_classes=...,
    **model_args)`` with the run's ``checkpoint_path`` weights loaded (see ``fedlight_adapter.json``).
    Call ``.eval()`` on the result before inference.
    """
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / "adapter_config.json").is_file():
        import peft

        return peft.PeftModel.from_pretrained(base_model, str(adapter_dir))
    path = adapter_dir / TRAINABLE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{adapter_dir} holds neither {TRAINABLE_FILE} nor adapter_config.json: not an adapter export"
        )
    state = load_file(str(path))
    params = dict(base_model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise KeyError(
            f"the base model has no tensors {missing[:5]}: is it the architecture the adapter was trained on?"
        )
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise ValueError(
                    f"{name}: adapter shape {tuple(value.shape)} != base shape {tuple(params[name].shape)}"
                )
            params[name].copy_(value.to(params[name].dtype))
    return base_model
