"""Bytes per round and accuracy of the LoRA-aware methods side by side, from each run's rounds.csv.

Runs the real CLI on scikit-learn digits with a small random ViT (embed 64, depth 4, 16 px), LoRA r=8 on
the attention layers, Dirichlet α = 0.5 over 10 clients, 4 per round, AdamW; every method with the same
seed, split and local steps. Prints a markdown table: uplink and downlink MB per round (round 1 and the
last round, where merging methods also broadcast the merged base change) and the final val_acc.

    python benchmarks/lora_agg_bytes.py [--rounds 3] [--local-steps 5] [--methods lora fedex_lora ...]
    python benchmarks/lora_agg_bytes.py --task pretrained   # DINOv2 ViT-S/14 + quickstart LoRA, Fashion-MNIST

A method is a PEFT method (``lora``, ``ffa_lora``, ``fedsa_lora``) run with FedAvg, or an aggregator
(``fedex_lora``, ``flora``, ``hetlora``, ``flexlora``) run on plain LoRA.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import yaml

PEFT = {"lora", "ffa_lora", "fedsa_lora"}
TASK = {
    "class_path": "image_classification",
    "init_args": {
        "model": "vit_tiny_patch16_224", "image_size": 16,
        "model_kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4},
    },
}  # fmt: skip


def config(method: str, args: argparse.Namespace, out: Path) -> dict:
    peft = {"class_path": method if method in PEFT else "lora", "init_args": {"r": 8, "alpha": 16, "target": "attention"}}
    fed = {"rounds": args.rounds, "clients_per_round": 4, "local_steps": args.local_steps, "checkpoint_every": 0}
    if method not in PEFT:
        fed["aggregator"] = {"class_path": method, "init_args": {"rank_tiers": [2, 4, 8]} if method in ("hetlora", "flexlora") else {}}
    if args.task == "pretrained":  # configs/vision/quickstart.yaml cut down; its LoRA (r=8 on qkv, shared head, lr 3e-3)
        from pretrained_vision import lora_spec, pretrained_config  # benchmarks/ is on sys.path when run as a script

        peft = {**lora_spec(), "class_path": peft["class_path"]}
        cfg = pretrained_config(out, rounds=args.rounds, num_clients=10, clients_per_round=4, local_steps=args.local_steps,
                                train=1000, val=300, peft=peft)  # fmt: skip
        cfg["federation"].update(fed)
        return cfg
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out)}},
        },
        "model": {"task": TASK, "peft": peft, "lr": 0.01},
        "data": {
            "dataset": {"class_path": "digits", "init_args": {"val_fraction": 0.2}},
            "partitioner": {"class_path": "dirichlet", "init_args": {"alpha": 0.5}},
            "num_clients": 10, "batch_size": 32,
        },
        "federation": fed,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["lora", "ffa_lora", "fedsa_lora", "fedex_lora", "flora", "hetlora", "flexlora"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--task", choices=["digits", "pretrained"], default="digits", help="pretrained: DINOv2 ViT-S/14 on Fashion-MNIST")
    args = parser.parse_args()
    from fedlight.cli import run_cli

    rows = []
    for method in args.methods:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "cfg.yaml"
            path.write_text(yaml.safe_dump(config(method, args, Path(tmp))))
            start = time.perf_counter()
            run_cli(["fit", "--config", str(path)])
            (csv_path,) = Path(tmp).rglob("rounds.csv")
            with csv_path.open() as f:
                history = [r for r in csv.DictReader(f) if int(r["round"]) > 0]
            rows.append((method, history, time.perf_counter() - start))
    model = ("pretrained DINOv2 ViT-S/14, 28 px, Fashion-MNIST, LoRA r=8 on qkv" if args.task == "pretrained"
             else "digits, ViT (embed 64, depth 4), LoRA r=8")  # fmt: skip
    print(f"\nLoRA-aware methods: {model}, 10 Dirichlet(0.5) clients, 4 per round, "
          f"{args.local_steps} local steps, {args.rounds} rounds, identity codecs")  # fmt: skip
    print(f"| method | uplink MB/round | downlink MB round 1 | downlink MB round {args.rounds} | final val_acc | time s |")
    print("|---|---|---|---|---|---|")
    for method, history, seconds in rows:
        up = float(history[-1]["uplink_bytes"]) / 1e6
        down1, down_last = float(history[0]["downlink_bytes"]) / 1e6, float(history[-1]["downlink_bytes"]) / 1e6
        print(f"| {method} | {up:.4f} | {down1:.4f} | {down_last:.4f} | {float(history[-1]['val_acc']):.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
