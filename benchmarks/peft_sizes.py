"""Trainable and shipped parameters per PEFT method for ViT-B/16 (224 px, 100 classes) and BERT-base.

Every registered PEFT method (default init args, ``head: shared``) is applied to random-weight
models; the shipped count is what :meth:`PeftMethod.shared_names` sends each round, and the bytes
are the identity codec's fp32 payload for one client's update (header included), side by side with
full fine-tuning. Models are built on the meta device where the method allows it (no memory, no
download); the byte count comes from shapes, exactly as ``len(IdentityCodec().encode(state))``.

    python benchmarks/peft_sizes.py
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

os.environ.setdefault("FEDLIGHT_DISABLE_PLUGIN_AUTOLOAD", "1")
warnings.filterwarnings("ignore")


def vit_b16() -> tuple[nn.Module, list[str]]:
    import timm

    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100), ["head"]


def bert_base() -> tuple[nn.Module, list[str]]:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(num_labels=100)), ["classifier"]


def payload_bytes(state_shapes: dict[str, torch.Size]) -> int:
    """Length of the identity codec's payload for fp32 tensors of these shapes (wire.pack's layout)."""
    import json

    from fedlight.codecs import wire

    entries = [{"name": k, "dtype": "float32", "shape": list(s), "nbytes": 4 * int(torch.Size(s).numel())} for k, s in state_shapes.items()]
    header = len(json.dumps({"meta": {"codec": "identity"}, "buffers": entries}, separators=(",", ":")).encode())
    return len(wire.MAGIC) + 4 + header + sum(e["nbytes"] for e in entries)


def measure(cls, build, family: str) -> tuple[int, int, int] | str:
    method = cls()
    try:
        method.check_family(family)
    except ValueError:
        return "n/a (family)"
    try:
        with torch.device("meta"):
            model, heads = build()
            model = method.apply(model, family, heads)
    except Exception:  # some peft initialisations need real tensors (SVD, QR, random masks)
        try:
            model, heads = build()
            model = method.apply(model, family, heads)
        except ValueError as err:
            return f"refused: {str(err)[:60]}"
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    shapes = {n: (params.get(n) if n in params else buffers[n]).shape for n in method.shared_names(model)}
    shipped = sum(torch.Size(s).numel() for s in shapes.values())
    return trainable, shipped, payload_bytes(shapes)


def main() -> None:
    from fedlight.plugins import build_registry

    reg = build_registry(autoload=False)
    for title, build, family in [("ViT-B/16, 224 px, 100 classes (timm)", vit_b16, "timm"), ("BERT-base, 100 labels (transformers)", bert_base, "transformers")]:
        rows = {name: measure(e.cls, build, family) for name, e in sorted(reg.entries["peft_methods"].items())}
        full = rows["full"][2]
        print(f"\n## {title}\n")
        print("| method | trainable | shipped | MB / client / round (fp32, up) | % of full |")
        print("|---|---:|---:|---:|---:|")
        for name, r in sorted(rows.items(), key=lambda kv: kv[1][1] if isinstance(kv[1], tuple) else -1):
            if isinstance(r, str):
                if not r.startswith("n/a"):
                    print(f"| {name} | {r} | | | |")
                continue
            print(f"| {name} | {r[0] / 1e6:.3f}M | {r[1] / 1e6:.3f}M | {r[2] / 1e6:.3f} | {100 * r[2] / full:.2f} |")


if __name__ == "__main__":
    main()
