"""Every YAML file in configs/ parses and runs one tiny round (as torchgeo does for its configs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import merge, round_callback, run_fit

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))


def _class_name(node) -> str:
    return (node.get("class_path") if isinstance(node, dict) else node) or ""


def shrink(cfg: dict, tmp_path: Path, tiny_bert_dir: Path, tiny_gpt2_dir: Path) -> dict:
    """Tiny overrides that keep the config's plugins but make it run in seconds."""
    cfg = merge(
        cfg,
        {
            "trainer": {
                "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "runs")}},
                "enable_checkpointing": False,
                "enable_progress_bar": False,
            },
            "data": {"batch_size": 4, "eval_batch_size": 32},
        },
    )  # fmt: skip
    fed = cfg.setdefault("federation", {})
    fed.update(rounds=1, clients_per_round=1, local_steps=1, local_epochs=None)
    task = cfg["model"]["task"]
    if _class_name(task) == "text_classification":
        task.setdefault("init_args", {})["model_name_or_path"] = str(tiny_bert_dir)
    if _class_name(task) in ("causal_lm", "dpo"):
        task["init_args"].update(
            model_name_or_path=str(tiny_gpt2_dir), max_length=32, max_new_tokens=4, generate_max_examples=4
        )
    dataset = cfg["data"]["dataset"]
    if _class_name(dataset) == "chatterbot":
        dataset.setdefault("init_args", {})["max_per_class"] = 10
    if _class_name(dataset) == "chatterbot_dialogue":
        dataset.setdefault("init_args", {})["max_pairs"] = 40
    if _class_name(dataset) == "chatterbot_preferences":
        dataset.setdefault("init_args", {})["max_pairs"] = 80
    if _class_name(dataset) == "fashion_mnist":
        dataset.setdefault("init_args", {}).update(max_train=40, max_val=20)
    if _class_name(dataset) == "hf_dataset":  # paths are relative to the repo root, as the README runs them
        args = dataset["init_args"]
        args.update(path=str(Path(__file__).parent.parent / args["path"]), cache_dir=str(tmp_path / "hf-cache"))
    return cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(p.parents[1])) for p in CONFIGS])
def test_config_runs_one_round(path, tmp_path, tiny_bert_dir, tiny_gpt2_dir):
    cfg = shrink(yaml.safe_load(path.read_text()), tmp_path, tiny_bert_dir, tiny_gpt2_dir)
    fed = round_callback(run_fit(cfg, tmp_path))
    assert fed.history[-1]["round"] == 1
    assert fed.history[-1]["num_clients"] == 1


def test_configs_exist():
    assert any(p.name == "quickstart.yaml" for p in CONFIGS)
    assert len(CONFIGS) >= 3


@pytest.mark.slow
def test_quickstart_learns_with_the_real_pretrained_model(tmp_path):
    """The README's quickstart, shortened to 3 rounds: accuracy rises well above round 0."""
    cfg = yaml.safe_load((Path(__file__).parent.parent / "configs" / "quickstart.yaml").read_text())
    cfg = merge(
        cfg,
        {
            "trainer": {
                "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "runs")}},
                "enable_progress_bar": False,
            },
            "federation": {"rounds": 3},
        },
    )  # fmt: skip
    history = round_callback(run_fit(cfg, tmp_path)).history
    accs = [r["val_acc"] for r in history]
    assert accs[-1] > accs[0] + 0.15, accs
