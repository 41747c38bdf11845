"""Accuracy vs bytes: LoRA with fp32 / int8 / 4-bit / top-k(1%)+error-feedback uplink vs full fine-tuning FedAvg.

Runs the real CLI side by side on one task, the same data, partition, seed and round plan for every
setting, and prints a markdown table: final validation accuracy, total MB sent (uplink + downlink over
all rounds, summed from each run's ``rounds.csv``), and the reduction vs full fine-tuning FedAvg with fp32.

    python benchmarks/codec_table.py --task digits                 # timm resnet10t on scikit-learn digits
    python benchmarks/codec_table.py --task quickstart --rounds 3  # configs/quickstart.yaml (MiniLM, slow)
    python benchmarks/codec_table.py --task pretrained --full-lr 1e-4  # DINOv2 ViT-S/14 on Fashion-MNIST, cut down

``--keep DIR`` keeps the run directories (then ``fedlight report DIR/*`` plots accuracy vs MB);
``--tabulate DIR...`` prints the table again from them; rerunning with the same ``--keep`` skips the
settings already there, and ``--only`` picks settings by label (e.g. to run them in parallel processes). On a shared machine set ``OMP_NUM_THREADS=1``
(with 2 threads per process on an oversubscribed CPU a digits round took 223 s instead of 9 s).
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

#: resnet10t has no linear layer outside its head: LoRA goes on every convolution (peft supports Conv2d)
RESNET10T_CONVS = [
    "conv1.0", "conv1.3", "conv1.6",
    *(f"layer{i}.0.conv{j}" for i in range(1, 5) for j in (1, 2)),
    *(f"layer{i}.0.downsample.1" for i in range(2, 5)),
]  # fmt: skip

IDENTITY = {"class_path": "identity"}
UPLINKS = {
    "fp32": IDENTITY,
    "int8": {"class_path": "int8"},  # per tensor, nearest rounding
    "int4": {"class_path": "int4"},  # per block of 64, nearest rounding
    "topk1%+EF": {"class_path": "topk", "init_args": {"density": 0.01, "error_feedback": True}},
}
INT4 = {"class_path": "int4"}
#: the JSON header (names, shapes) is a large part of a small adapter's payload; zlib squeezes it
ZLIB_INT4 = {"class_path": "compress", "init_args": {"algorithm": "zlib", "level": 9, "inner": INT4}}
#: (label, peft, uplink, downlink codec, LoRA rank or None for --lora-r); the full FT row is the baseline
SETTINGS = [
    ("full FT, fp32", "full", "fp32", IDENTITY, None),
    *((f"LoRA, {up} uplink", "lora", up, IDENTITY, None) for up in UPLINKS),
]
#: --extra: also compress the downlink and shrink the adapter (not asked by the issue; shows where the remaining bytes go)
EXTRA = [
    ("LoRA, topk1%+EF up, int8 down", "lora", "topk1%+EF", {"class_path": "int8"}, None),
    ("LoRA, int4 up, int4 down", "lora", "int4", INT4, None),
    ("LoRA r=1, int4 up, int4 down", "lora", "int4", INT4, 1),
    ("LoRA r=1, zlib(int4) up, zlib(int4) down", "lora", "zlib(int4)", ZLIB_INT4, 1),
]
UPLINKS["zlib(int4)"] = ZLIB_INT4  # after SETTINGS: the issue's rows are the four uplinks above


#: --task pretrained: configs/vision/quickstart.yaml at these sizes (each overridable from the command line)
PRETRAINED_SIZES = {"rounds": 6, "num_clients": 10, "clients_per_round": 4, "local_steps": 5, "train": 1000, "val": 300}


def base_config(task: str, args: argparse.Namespace | None = None) -> dict:
    """The shipped config of the task (data, partition, model, rounds, seed 0); ``pretrained`` cut to PRETRAINED_SIZES."""
    if task == "pretrained":
        from pretrained_vision import pretrained_config  # benchmarks/ is on sys.path when this runs as a script

        sizes = {k: getattr(args, k, None) or v for k, v in PRETRAINED_SIZES.items()}
        return pretrained_config(Path("."), **sizes)  # the logger is replaced in config()
    path = "configs/vision/digits_resnet.yaml" if task == "digits" else "configs/quickstart.yaml"
    return yaml.safe_load((ROOT / path).read_text())


def lora_spec(task: str, r: int) -> dict:
    if task == "pretrained":
        from pretrained_vision import lora_spec as quickstart_lora

        return quickstart_lora(r)
    if task == "digits":
        return {"class_path": "lora", "init_args": {"r": r, "alpha": 2 * r, "target": RESNET10T_CONVS, "head": "shared"}}
    return {"class_path": "lora", "init_args": {"r": r, "alpha": 2 * r, "target": "attention", "head": "shared"}}


def config(args: argparse.Namespace, peft: str, uplink: dict, downlink: dict, rank: int | None, out: Path) -> dict:
    cfg = copy.deepcopy(base_config(args.task, args))
    cfg["trainer"].update(
        {
            "enable_progress_bar": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out), "name": "run"}},
            "enable_checkpointing": False,
        }
    )
    cfg["model"]["peft"] = "full" if peft == "full" else lora_spec(args.task, rank or args.lora_r)
    cfg["model"]["lr"] = args.full_lr if peft == "full" else args.lora_lr
    fed = cfg["federation"]
    for key in ("rounds", "clients_per_round", "local_steps"):
        if getattr(args, key) is not None:
            fed[key] = getattr(args, key)
    if args.num_clients is not None:
        cfg["data"]["num_clients"] = args.num_clients
    fed.update({"uplink_codec": uplink, "downlink_codec": downlink, "checkpoint_every": 0})
    return cfg


def read_rounds(run_dir: Path) -> list[dict[str, str]]:
    (path,) = run_dir.rglob("rounds.csv")
    with path.open() as f:
        return list(csv.DictReader(f))


def summarize(run_dir: Path, at_round: int | None = None) -> dict:
    """Final and last-3-round mean val_acc, and bytes summed over all rounds (up to ``at_round``), from rounds.csv."""
    rows = read_rounds(run_dir)
    train = [r for r in rows if 0 < int(r["round"]) <= (at_round or 10**9)]
    accs = [float(r["val_acc"]) for r in train]
    return {
        "label": (run_dir / "label.txt").read_text().strip(),
        "rounds": len(train),
        "acc": accs[-1],
        "acc3": sum(accs[-3:]) / len(accs[-3:]),
        "up": sum(int(r["uplink_bytes"] or 0) for r in train),
        "down": sum(int(r["downlink_bytes"] or 0) for r in train),
    }


def table(results: list[dict]) -> str:
    base = next(r for r in results if r["label"].startswith("full FT"))
    results = [base] + [r for r in results if r is not base]
    base_total = base["up"] + base["down"]
    lines = [
        "| setting | final val_acc | mean val_acc, last 3 rounds | Δ final vs full FT (points) | uplink MB | downlink MB | total MB | reduction vs full FT | bytes saved |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        total = r["up"] + r["down"]
        lines.append(
            f"| {r['label']} | {r['acc']:.4f} | {r['acc3']:.4f} | {100 * (r['acc'] - base['acc']):+.1f} | {r['up'] / 1e6:.3f} | "
            f"{r['down'] / 1e6:.3f} | {total / 1e6:.3f} | {base_total / total:,.1f}× | {100 * (1 - total / base_total):.2f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["digits", "quickstart", "pretrained"], default="digits")
    parser.add_argument("--rounds", type=int, default=None, help="default: the config's")
    parser.add_argument("--clients-per-round", type=int, default=None)
    parser.add_argument("--num-clients", type=int, default=None)
    parser.add_argument("--local-steps", type=int, default=None)
    parser.add_argument("--train", type=int, default=None, help="--task pretrained: training images (default 1000)")
    parser.add_argument("--val", type=int, default=None, help="--task pretrained: validation images (default 300)")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-lr", type=float, default=0.003)
    parser.add_argument("--full-lr", type=float, default=0.003)
    parser.add_argument("--only", nargs="+", default=None, help="run only settings whose label contains one of these (the baseline is 'full FT')")
    parser.add_argument("--extra", action="store_true", help="also run " + "; ".join(e[0] for e in EXTRA))
    parser.add_argument("--keep", type=Path, default=None, help="keep run directories here")
    parser.add_argument("--at-round", type=int, default=None, help="with --tabulate: cut every run at this round")
    parser.add_argument("--tabulate", type=Path, nargs="+", default=None, help="print the table of the runs kept in these directories, run nothing")
    args = parser.parse_args()
    os.environ.setdefault("FEDLIGHT_DISABLE_PLUGIN_AUTOLOAD", "1")
    from fedlight.cli import run_cli

    # numbered in the full list, so runs of different --only/--extra selections never share a directory
    settings = [(i, *s) for i, s in enumerate(SETTINGS + EXTRA) if args.extra or i < len(SETTINGS)]
    if args.only:
        settings = [s for s in settings if any(o in s[1] for o in args.only)]
    if args.tabulate:
        dirs = sorted((d for t in args.tabulate for d in t.iterdir() if (d / "label.txt").exists()), key=lambda d: d.name)
        results = [summarize(d, args.at_round) for d in dirs]
        if len({r["rounds"] for r in results}) > 1:
            print(f"warning: runs have different numbers of rounds {[r['rounds'] for r in results]}; use --at-round")
        print(f"{results[0]['rounds']} rounds, from {' '.join(map(str, args.tabulate))}\n")
        print(table(results))
        return
    keep = args.keep or Path(tempfile.mkdtemp(prefix="codec_table_"))
    keep.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for i, label, peft, up, downlink, rank in settings:
        out = keep / f"{i}_{label.replace(', ', '_').replace(' ', '-').replace('%', 'pct').replace('+', '_').replace('=', '')}"
        if peft == "full":
            label += f" (lr {args.full_lr:g})"
        if (out / "label.txt").exists() and list(out.rglob("rounds.csv")):
            print(f"{label}: kept from an earlier run in {out}")
            continue
        out.mkdir(parents=True, exist_ok=True)
        path = out / "config.yaml"
        path.write_text(yaml.safe_dump(config(args, peft, UPLINKS[up], downlink, rank, out), sort_keys=False))
        t0 = time.perf_counter()
        run_cli(["fit", "--config", str(path)])
        (out / "label.txt").write_text(label + "\n")  # written last: a run killed midway is rerun
        r = summarize(out)
        print(f"{label:>32}  val_acc={r['acc']:.4f}  up={r['up'] / 1e6:.3f} MB  down={r['down'] / 1e6:.3f} MB  ({time.perf_counter() - t0:.0f} s)", flush=True)
    results = [summarize(d) for d in sorted(keep.iterdir(), key=lambda d: d.name) if (d / "label.txt").exists()]
    print(f"\n{args.task}: {results[0]['rounds']} rounds, total {time.perf_counter() - start:.0f} s, run directories in {keep}\n")
    print(table(results))


if __name__ == "__main__":
    main()
