"""What a run trains, what travels and what stays: a manifest written before round 1.

Every parameter of a built :class:`~fedlight.core.module.FederatedModule` falls into exactly one category:

* ``shared`` — trained and sent each round (the PEFT method's ``shared_names``);
* ``local``  — trained, but kept on each client (``local_names``, e.g. a personal head);
* ``frozen`` — never trained, never sent (``frozen_names()``).

``shared_bytes_per_round`` is the real length of the given codec's payload of the shared state (what one
client sends per round, as counted in ``rounds.csv``); ``full_model_bytes_per_round`` is the length of the
identity (fp32) payload of all parameters of the plain base model (adapter tensors left out), i.e. what
full fine-tuning would send. Their ratio is the
communication reduction ``fedlight report`` shows. ``base`` holds the base model's real memory: bytes of the
storage its tensors hold (a torchao int8 weight counts its int8 data and scales, not the float32 its dtype
reports), the same base in fp32, and the quantization method.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fedlight.codecs import wire
from fedlight.codecs.base import Codec
from fedlight.codecs.identity import IdentityCodec
from fedlight.core.quantized import is_quantized, logical_numel, tensor_bytes
from fedlight.core.storage import atomic_write_text

CATEGORIES = ("shared", "local", "frozen")
MANIFEST_VERSION = 1


def identity_payload_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    """``len(IdentityCodec().encode(state))`` for fp32 tensors of these shapes, without materialising them.

    Mirrors :func:`fedlight.codecs.wire.pack` (magic, header length, JSON header, raw buffers, CRC32), so a
    billion-parameter model costs no memory; the manifest test checks it against a real encode.
    """
    entries, total = [], 0
    for name, shape in shapes.items():
        numel = 1
        for s in shape:
            numel *= int(s)
        nbytes = 4 * numel
        entries.append({"name": name, "dtype": "float32", "shape": [int(s) for s in shape], "nbytes": nbytes})
        total += nbytes
    meta = {"codec": IdentityCodec.name, **IdentityCodec().wire_params()}
    header = json.dumps({"meta": meta, "buffers": entries}, separators=(",", ":")).encode()
    return wire.framed_size(len(header), total)


def full_model_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the plain model full fine-tuning would train and send.

    For a ``peft.PeftModel`` the tuner's own tensors (``lora_*``, ...) and peft's trainable copies of
    ``modules_to_save`` are left out and wrapper name parts dropped, so every method on the same base
    reports the same number.
    """
    if not hasattr(model, "get_base_model"):
        return {n: tuple(p.shape) for n, p in model.named_parameters()}
    prefix = getattr(model.base_model, "prefix", None)
    shapes = {}
    for n, p in model.named_parameters():
        if (prefix and prefix in n) or ".modules_to_save." in n:
            continue
        clean = n.removeprefix("base_model.model.").replace(".base_layer", "").replace(".original_module", "")
        shapes[clean] = tuple(p.shape)
    return shapes


def base_memory(model: torch.nn.Module, quantization: Any = None) -> dict[str, Any]:
    """Real memory of the base model (adapter tensors and peft's trainable head copies left out).

    ``bytes``: storage its parameters and buffers hold; ``fp32_bytes``: the same tensors in float32;
    ``quantized_tensors``: how many are quantized; ``quantization``: the task's method, or None.
    """
    base = set(full_model_shapes(model)) if hasattr(model, "get_base_model") else None
    prefix = getattr(getattr(model, "base_model", None), "prefix", None) if base is not None else None
    total = fp32 = quantized = 0
    for name, tensor in {**dict(model.named_buffers()), **dict(model.named_parameters())}.items():
        if base is not None and ((prefix and prefix in name) or ".modules_to_save." in name):
            continue
        total += tensor_bytes(tensor)
        fp32 += (
            4 * logical_numel(tensor) if tensor.is_floating_point() or is_quantized(tensor) else tensor_bytes(tensor)
        )
        quantized += is_quantized(tensor)
    return {
        "bytes": total,
        "fp32_bytes": fp32,
        "quantized_tensors": quantized,
        "quantization": getattr(quantization, "method", quantization),
    }


def _entry(name: str, param: torch.Tensor) -> dict[str, Any]:
    return {
        "name": name,
        "shape": list(param.shape),
        "dtype": str(param.dtype).removeprefix("torch."),
        "numel": param.numel(),
    }


def build_manifest(module, codec: Codec | None = None, downlink_codec: Codec | None = None) -> dict[str, Any]:
    """The manifest of a built FederatedModule (``module.model`` set) under the uplink ``codec``.

    Returns a JSON-serialisable dict: ``method``, ``task``, ``model``, per category a list of
    ``{name, shape, dtype, numel}`` (``tensors``) plus ``counts`` (tensors, numel, in-memory bytes),
    ``shared_bytes_per_round`` (one client's uplink payload length with ``codec``; identity by default),
    ``downlink_bytes_per_client`` (with ``downlink_codec``, when given), ``full_model_bytes_per_round``
    and ``reduction`` (full / shared).
    """
    if module.model is None:
        raise ValueError("build the module first (FederatedModule.build / trainer setup): it has no model yet")
    codec = codec or IdentityCodec()
    model, peft = module.model, module.peft
    params = peft.named_tensors(model)  # parameters, plus buffers a method ships
    names = {"shared": list(module.shared_names), "local": list(module.local_names), "frozen": module.frozen_names()}
    seen: dict[str, str] = {}
    for category, category_names in names.items():
        for n in category_names:
            if n in seen:
                raise ValueError(f"tensor {n!r} is both {seen[n]} and {category}")
            seen[n] = category
    unassigned = [n for n, _ in model.named_parameters() if n not in seen]
    if unassigned:
        raise ValueError(f"tensors in no category (trainable but neither shared nor local?): {unassigned[:5]}")

    manifest: dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "method": getattr(peft, "name", type(peft).__name__),
        "head": getattr(peft, "head", None),
        "merges_into_base": bool(getattr(peft, "merges_into_base", False)),
        "task": getattr(module.task, "name", type(module.task).__name__),
        "model": type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__,
        "codec": codec.name,
    }
    total_numel = sum(p.numel() for p in model.parameters())
    for category in CATEGORIES:
        tensors = [_entry(n, params[n]) for n in names[category]]
        numel = sum(t["numel"] for t in tensors)
        manifest[category] = {
            "tensors": tensors,
            "counts": {
                "tensors": len(tensors),
                "numel": numel,
                "bytes": sum(tensor_bytes(params[n]) for n in names[category]),
                "fraction": numel / total_numel if total_numel else 0.0,
            },
        }
    manifest["total_numel"] = total_numel
    manifest["base"] = base_memory(model, getattr(module.task, "quantization", None))
    shared_state = peft.get_state(model, names["shared"])
    manifest["shared_bytes_per_round"] = len(codec.encode(shared_state))
    if downlink_codec is not None:
        manifest["downlink_codec"] = downlink_codec.name
        manifest["downlink_bytes_per_client"] = len(downlink_codec.encode(shared_state))
    manifest["full_model_bytes_per_round"] = identity_payload_bytes(full_model_shapes(model))
    shared = manifest["shared_bytes_per_round"]
    manifest["reduction"] = manifest["full_model_bytes_per_round"] / shared if shared else None
    return manifest


def write_manifest(manifest: dict[str, Any], path: str | Path) -> Path:
    """Write the manifest as indented JSON (a directory gets ``manifest.json`` inside it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    return atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    return json.loads((path / "manifest.json" if path.is_dir() else path).read_text())


def _count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _bytes(n: int) -> str:
    for div, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def format_manifest(manifest: dict[str, Any]) -> str:
    """A short human summary, printed before round 1."""
    what = {
        "shared": "trained, sent every round",
        "local": "trained, stays on each client",
        "frozen": "never trained or sent",
    }
    lines = [
        f"[fedlight] {manifest['method']} on {manifest['model']} ({manifest['task']}), {_count(manifest['total_numel'])} parameters"
    ]
    for category in CATEGORIES:
        c = manifest[category]["counts"]
        lines.append(
            f"  {category:<6} {c['tensors']:>5} tensors {_count(c['numel']):>8} params "
            f"({100 * c['fraction']:.3g}%)  {what[category]}"
        )
    base = manifest.get("base")
    if base:
        how = (
            f"{base['quantization']}, {base['quantized_tensors']} quantized tensors"
            if base["quantization"]
            else "not quantized"
        )
        lines.append(f"  base in memory: {_bytes(base['bytes'])} ({how}; fp32: {_bytes(base['fp32_bytes'])})")
    shared, full = manifest["shared_bytes_per_round"], manifest["full_model_bytes_per_round"]
    line = f"  uplink per client per round: {_bytes(shared)} ({manifest['codec']} codec)"
    if "downlink_bytes_per_client" in manifest:
        line += f"; downlink {_bytes(manifest['downlink_bytes_per_client'])} ({manifest['downlink_codec']})"
    lines.append(line)
    if manifest.get("reduction"):
        lines.append(f"  full fine-tuning would send {_bytes(full)}: {manifest['reduction']:,.1f}x more")
    return "\n".join(lines)
