"""Final accuracy of FedAvg vs robust aggregators under each attack, 20% malicious clients.

Runs the real CLI on scikit-learn digits (timm resnet10t, random init, full fine-tuning, 10 Dirichlet(1)
clients, all sampled every round so each round has 2 attackers) and prints a markdown table. ``--task
pretrained`` runs the same federation (10 Dirichlet(1) clients, all sampled, 2 attackers) on the pretrained
DINOv2 ViT-S/14 of ``configs/vision/quickstart.yaml`` with its LoRA (r=8, ``qkv``, shared head) on Fashion-MNIST.

    python benchmarks/attack_table.py [--rounds 6] [--aggregators fedavg median ...]
    python benchmarks/attack_table.py --task pretrained --rounds 3 --aggregators fedavg median trimmed_mean \
        --attacks none gaussian_noise scaling alie
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import yaml

ATTACKS = [None, "sign_flip", "gaussian_noise", "scaling", "alie", "label_flip"]
ATTACK_ARGS = {"gaussian_noise": {"std": 1.0}, "scaling": {"factor": 10.0}}
#: defences configured for 2 attackers among 10 clients
AGGREGATOR_ARGS = {
    "trimmed_mean": {"beta": 0.2},
    "krum": {"num_byzantine": 2, "num_selected": 1},
    "multi_krum": {"num_byzantine": 2, "num_selected": 6},
    "norm_bounding": {"max_norm": 2.0},
}


def config(aggregator: str, attack: str | None, rounds: int, out: Path, task: str = "digits", local_steps: int = 5) -> dict:
    spec = {"class_path": "krum" if aggregator == "multi_krum" else aggregator, "init_args": AGGREGATOR_ARGS.get(aggregator, {})}
    fed = {"rounds": rounds, "clients_per_round": 10, "local_steps": local_steps, "aggregator": spec, "checkpoint_every": 0}
    if attack:
        fed["attack"] = {"class_path": attack, "init_args": ATTACK_ARGS.get(attack, {})}
        fed["malicious_fraction"] = 0.2
    if task == "pretrained":
        from pretrained_vision import pretrained_config  # benchmarks/ is on sys.path when this runs as a script

        cfg = pretrained_config(out, rounds=rounds, num_clients=10, clients_per_round=10, local_steps=local_steps, train=1000, val=300)
        cfg["data"]["partitioner"] = {"class_path": "dirichlet", "init_args": {"alpha": 1.0}}
        cfg["federation"].update(fed)
        return cfg
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out)}},
        },
        "model": {
            "task": {"class_path": "image_classification", "init_args": {"model": "resnet10t", "image_size": 16}},
            "peft": "full",
            "lr": 0.003,
        },
        "data": {
            "dataset": "digits",
            "partitioner": {"class_path": "dirichlet", "init_args": {"alpha": 1.0}},
            "num_clients": 10,
            "batch_size": 32,
        },
        "federation": fed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--aggregators", nargs="+", default=["fedavg", "median", "trimmed_mean", "krum", "multi_krum", "norm_bounding", "geometric_median"])
    parser.add_argument("--attacks", nargs="+", default=[a or "none" for a in ATTACKS], choices=[a or "none" for a in ATTACKS])
    parser.add_argument("--task", choices=["digits", "pretrained"], default="digits", help="pretrained: DINOv2 ViT-S/14 + LoRA on Fashion-MNIST")
    parser.add_argument("--local-steps", type=int, default=5)
    args = parser.parse_args()
    attacks = [None if a == "none" else a for a in args.attacks]
    os.environ.setdefault("FEDLIGHT_DISABLE_PLUGIN_AUTOLOAD", "1")
    from fedlight.cli import run_cli
    from fedlight.core.round import FederatedRound

    results: dict[tuple[str, str], float] = {}
    start = time.perf_counter()
    for aggregator in args.aggregators:
        for attack in attacks:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "cfg.yaml"
                path.write_text(yaml.safe_dump(config(aggregator, attack, args.rounds, Path(tmp), args.task, args.local_steps)))
                cli = run_cli(["fit", "--config", str(path)])
                fed = next(c for c in cli.trainer.callbacks if isinstance(c, FederatedRound))
                results[(aggregator, attack or "none")] = fed.history[-1]["val_acc"]
                print(f"{aggregator:>18} {attack or 'none':>15} val_acc={results[(aggregator, attack or 'none')]:.3f}", flush=True)
    columns = [a or "none" for a in attacks]
    print(f"\n{args.task}: final val_acc after {args.rounds} rounds, 20% malicious clients ({time.perf_counter() - start:.0f} s):\n")
    print("| aggregator | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for aggregator in args.aggregators:
        print(f"| {aggregator} | " + " | ".join(f"{results[(aggregator, c)]:.3f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
