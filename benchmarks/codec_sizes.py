"""Bytes on the wire for one 1M-parameter update, per codec, measured as ``len(codec.encode(update))``.

The update is 16 tensors of 250 x 250 (1,000,000 fp32 values, LoRA-like shapes) of N(0, 1e-3^2)
noise: client deltas look like noise, so this is the honest case for the lossless wrapper. Every row
is a real encode (header included) and a real decode, whose max error relative to max|x| is shown.

    python benchmarks/codec_sizes.py
"""

from __future__ import annotations

import os
import time

import torch

os.environ.setdefault("FEDLIGHT_DISABLE_PLUGIN_AUTOLOAD", "1")

from fedlight.codecs.base import Codec  # noqa: E402
from fedlight.plugins import build_registry  # noqa: E402


def rows(registry) -> list[tuple[str, Codec]]:
    def make(name: str, **kwargs) -> Codec:
        return registry.get("codecs", name).cls(**kwargs)

    return [
        ("identity", make("identity")),
        ("fp16", make("fp16")),
        ("bf16", make("bf16")),
        ("int8 (tensor)", make("int8")),
        ("int8 (channel)", make("int8", granularity="channel")),
        ("int8 (block 64)", make("int8", granularity="block", block_size=64)),
        ("int8 (tensor, stochastic)", make("int8", stochastic=True)),
        ("int4 (tensor)", make("int4", granularity="tensor")),
        ("int4 (block 64)", make("int4")),
        ("topk (density 0.01)", make("topk", density=0.01)),
        ("randk (density 0.01)", make("randk", density=0.01)),
        ("topk (density 0.1)", make("topk", density=0.1)),
        ("compress zlib (identity)", make("compress", algorithm="zlib")),
        ("compress lzma (identity)", make("compress", algorithm="lzma")),
        ("compress zlib (int8 tensor)", make("compress", inner=make("int8"), algorithm="zlib")),
        ("compress lzma (int4 block 64)", make("compress", inner=make("int4"), algorithm="lzma")),
        ("compress zlib (topk 0.01)", make("compress", inner=make("topk", density=0.01), algorithm="zlib")),
    ]


def main() -> None:
    torch.manual_seed(0)
    update = {f"layers.{i}.lora.weight": torch.randn(250, 250) * 1e-3 for i in range(16)}
    n = sum(v.numel() for v in update.values())
    reference = None
    print(f"| codec (init args) | bytes for {n:,} params | bytes/param | vs identity | max err / max abs | encode+decode s |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, codec in rows(build_registry(autoload=False)):
        start = time.perf_counter()
        payload = codec.encode(update)
        decoded = codec.decode(payload)
        seconds = time.perf_counter() - start
        reference = reference or len(payload)
        err = max(float((decoded[k] - v).abs().max() / v.abs().max()) for k, v in update.items())
        print(
            f"| {label} | {len(payload):,} | {len(payload) / n:.4f} | {reference / len(payload):.1f}x | {err:.2e} | {seconds:.2f} |"
        )


if __name__ == "__main__":
    main()
