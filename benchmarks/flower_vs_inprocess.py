"""In-process `fedlight fit` vs the same config on Flower (Simulation Runtime; optionally a local deployment).

Each engine runs as its own command in a fresh process (imports included), on the same tiny workload:
a random tiny ViT on scikit-learn digits, bias-only tuning, N clients. Reported per engine: wall time of
the command, the mean round time (the engines' own ``round_time_s``: broadcast -> local fits -> aggregation
-> validation), the fixed cost (wall - sum of round times: imports, model/data set-up, Ray or SuperLink
start-up, shut-down) and the ratios to in-process. Also checks that the final global states agree.

    nice -n 10 python benchmarks/flower_vs_inprocess.py [--rounds 5] [--clients 4] [--per-round 2]
        [--steps 5] [--threads 1] [--engines inprocess,simulation,deployment]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def config(tmp: Path, rounds: int, clients: int, per_round: int, steps: int) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp / "runs"), "name": "b"}},
            "enable_checkpointing": False,
            "enable_progress_bar": False,
        },
        "model": {
            "task": {
                "class_path": "image_classification",
                "init_args": {
                    "model": "vit_tiny_patch16_224",
                    "image_size": 16,
                    "model_kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
                },
            },
            "peft": {"class_path": "bitfit"},
            "lr": 0.01,
        },
        "data": {
            "dataset": {"class_path": "digits", "init_args": {"val_fraction": 0.2}},
            "partitioner": {"class_path": "dirichlet", "init_args": {"alpha": 1.0}},
            "num_clients": clients,
            "batch_size": 8,
            "eval_batch_size": 64,
        },
        "federation": {"rounds": rounds, "clients_per_round": per_round, "local_steps": steps, "checkpoint_every": 0},
    }  # fmt: skip


def timed(argv: list[str], log: Path, threads: int | None = None) -> float:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:  # torch intra-op threads of every process (Ray's ClientApp actors always get 1)
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.call(argv, stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    if code != 0:
        sys.exit(f"{' '.join(argv)} failed ({code}); see {log}")
    return wall


def rounds_of(rows: list[dict]) -> list[float]:
    return [float(r["round_time_s"]) for r in rows if int(float(r["round"])) > 0 and r.get("round_time_s") not in ("", None)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--per-round", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--num-cpus", type=int, default=2, help="Ray CPUs (one per ClientApp actor)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every engine (default: unset)")
    parser.add_argument("--engines", default="inprocess,simulation", help="comma list of inprocess, simulation, deployment")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="flower-bench-"))
    cfg_path = tmp / "bench.yaml"
    cfg_path.write_text(yaml.safe_dump(config(tmp, args.rounds, args.clients, args.per_round, args.steps)))
    bin_dir = Path(sys.executable).parent
    results: dict[str, dict] = {}
    engines = set(args.engines.split(","))
    states: dict[str, Path] = {}

    wall = timed([str(bin_dir / "fedlight"), "fit", "--config", str(cfg_path)], tmp / "inprocess.log", args.threads)
    (csv_path,) = list((tmp / "runs").rglob("rounds.csv"))
    with csv_path.open() as f:
        results["in-process (fedlight fit)"] = {"wall": wall, "rounds": rounds_of(list(csv.DictReader(f)))}

    sim_out = tmp / "sim"
    if "simulation" in engines:
        wall = timed(
            [str(bin_dir / "fedlight-flower"), "simulate", "--config", str(cfg_path), "--out", str(sim_out), "--num-cpus", str(args.num_cpus)],
            tmp / "simulation.log",
            args.threads,
        )
        results[f"Flower simulation (Ray, {args.num_cpus} CPUs)"] = {
            "wall": wall, "rounds": rounds_of(json.loads((sim_out / "rounds.json").read_text()))
        }  # fmt: skip
        states["Flower simulation"] = sim_out / "global_state.safetensors"

    if "deployment" in engines:
        dep_out = tmp / "deployment"
        wall = timed([str(bin_dir / "fedlight-flower"), "local", "--config", str(cfg_path), "--out", str(dep_out)], tmp / "deployment.log", args.threads)
        results[f"Flower deployment (SuperLink + {args.clients} SuperNodes, local)"] = {
            "wall": wall, "rounds": rounds_of(json.loads((dep_out / "results" / "rounds.json").read_text()))
        }  # fmt: skip
        states["Flower deployment"] = dep_out / "results" / "global_state.safetensors"

    print(
        f"workload: tiny ViT (2 x 32-wide blocks) on digits, bitfit, {args.clients} clients, {args.per_round}/round, "
        f"{args.steps} local steps, {args.rounds} rounds; {os.cpu_count()} CPUs; OMP_NUM_THREADS={args.threads or 'unset'}"
    )
    base = results["in-process (fedlight fit)"]
    base_round = sum(base["rounds"]) / len(base["rounds"])
    base_fixed = base["wall"] - sum(base["rounds"])
    print("| engine | wall (s) | mean round (s) | fixed cost (s) | round ratio | wall ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        mean = sum(r["rounds"]) / len(r["rounds"])
        fixed = r["wall"] - sum(r["rounds"])
        print(
            f"| {name} | {r['wall']:.1f} | {mean:.3f} | {fixed:.1f} | {mean / base_round:.2f}x | {r['wall'] / base['wall']:.2f}x |"
        )
    print(f"(in-process fixed cost {base_fixed:.1f}s; round times exclude it; run dir {tmp})")

    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    sys.argv = sys.argv[:1]
    from fedlight.cli import run_cli
    from fedlight.core.round import FederatedRound

    cli = run_cli(["fit", "--config", str(cfg_path), "--trainer.logger", "false"])
    fed = next(c for c in cli.trainer.callbacks if isinstance(c, FederatedRound))
    for name, path in states.items():
        state = load_file(str(path))
        diff = max(float((fed.global_state[k].float() - state[k]).abs().max()) for k in state)
        print(f"max |in-process (1 thread) - {name}| over the final trainable state: {diff:.3g}")


if __name__ == "__main__":
    main()
