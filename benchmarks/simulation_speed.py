"""Simulation speed, measured side by side in one run: a plain PyTorch loop vs fedlight vs Flower.

Every engine trains the same model (built by the same task + PEFT method) on the same client batches
(fedlight's partition and round plans); what differs is the machinery around the training:

* **plain loop**: per sampled client, copy the global trainable tensors in, a fresh AdamW, its local
  steps (the task's own loss), the delta; example-weighted FedAvg; validation. No Lightning, no codec.
* **fedlight** ``fedlight fit`` on the same config, in this process (Lightning loop, the round engine,
  identity codecs, byte counting, the CSV logger), once per ``federation.execution`` in ``--executions``:
  ``steps`` (each local step a Lightning step), ``sequential`` (the engine runs a whole client inside one
  Lightning step) and ``grouped`` (the round's clients stacked in one vectorised step per local step).
* **Flower simulation**: ``fedlight-flower simulate`` as a subprocess (its own ``round_time_s``), when
  the plugin is installed and ``--flower`` is given (it needs minutes at 100 clients per round).

A round's time is wall time between the ends of consecutive rounds (everything in between: data
loaders, hooks, validation), the first round left out (it carries set-up). Workloads:

* ``vit100`` / ``vit1000``: tiny timm ViT (2 blocks x 32 wide, 16 px) + BitFit on scikit-learn digits,
  Dirichlet(1.0), batch 8, 5 local steps; 100 clients / 10 per round, and 1000 clients / 100 per round
  (IID there: 1,437 training images cannot give 1,000 Dirichlet clients 2 examples each).
* ``quickstart``: all-MiniLM-L6-v2 + LoRA (configs/quickstart.yaml), 20 clients / 5 per round, 3 local steps.
* ``cuda`` (``--device cuda``): ViT-B/16 (random init) + LoRA on digits at 224 px: 8 clients x 1 step of
  batch 16 per round vs one centralized step of batch 128; skipped without CUDA.

    OMP_NUM_THREADS=1 python benchmarks/simulation_speed.py [--workloads vit100,vit1000,quickstart]
        [--rounds 4] [--threads 1] [--executions steps,sequential,grouped] [--flower] [--device cpu|cuda]
        [--devices 1,2]   # instead: round time on 1 vs 2 processes (trainer.strategy fedlight_ddp)
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("FEDLIGHT_DISABLE_PLUGIN_AUTOLOAD", "1")


def vit_config(tmp: Path, rounds: int, clients: int, per_round: int, steps: int = 5) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from flower_vs_inprocess import config  # the workload of the Flower benchmark, written once

    return config(tmp, rounds, clients, per_round, steps)


def vit1000_config(tmp: Path, rounds: int) -> dict:
    """1,437 digits over 1,000 clients: Dirichlet(1.0) cannot give each 2 examples, so IID (1-2 each)."""
    cfg = vit_config(tmp, rounds, 1000, 100)
    cfg["data"]["partitioner"] = {"class_path": "iid"}
    return cfg


def quickstart_config(tmp: Path, rounds: int) -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp / "runs")
    cfg["trainer"]["enable_progress_bar"] = False
    cfg["federation"].update(rounds=rounds, local_steps=3, checkpoint_every=0)
    return cfg


VIT_B16 = {"model": "vit_base_patch16_224", "image_size": 224}


def cuda_config(tmp: Path, rounds: int, device: str = "cuda", task: dict | None = None) -> dict:
    """ViT-B/16 + LoRA, 8 clients x 1 step of batch 16 (``task``/``device`` replaceable so the same path
    runs on CPU with a tiny model in tests/test_benchmarks.py)."""
    cfg = vit_config(tmp, rounds, 8, 8, steps=1)
    cfg["trainer"]["accelerator"] = device
    cfg["model"]["task"]["init_args"] = dict(task or VIT_B16)
    cfg["central"] = 128  # this workload also times one centralized step of batch 8 x 16
    cfg["model"]["peft"] = {"class_path": "lora", "init_args": {"r": 8, "alpha": 16}}
    cfg["data"].update(batch_size=16, partitioner={"class_path": "iid"})
    return cfg


def build_cli(cfg: dict, tmp: Path, name: str):
    from fedlight.cli import run_cli

    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "central"}))  # "central": ours, not fit's
    return run_cli(["--config", str(path)], run=False)


def fedlight_rounds(cfg: dict, tmp: Path) -> tuple[list[float], float, object]:
    """``fedlight fit`` in this process: per-round wall times (first round left out) and the fixed cost."""
    import lightning.pytorch as pl

    stamps: list[float] = []

    class RoundTimer(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            stamps.append(clock())

    t0 = time.perf_counter()
    cli = build_cli(cfg, tmp, "fedlight")
    cli.trainer.callbacks.append(RoundTimer())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    wall = time.perf_counter() - t0
    rounds = [b - a for a, b in itertools.pairwise(stamps)]
    return rounds, wall - sum(r.wall for r in rounds), cli


def plain_rounds(cfg: dict, tmp: Path, device: str = "cpu") -> tuple[list[float], dict]:
    """The plain loop on the same model and batches; returns per-round times (first left out) and the state."""
    import torch

    from fedlight.core.datamodule import RoundBatchSampler, resolve_seed
    from fedlight.core.engine import Population
    from fedlight.core.round import FederatedRound

    cli = build_cli(cfg, tmp, "plain")
    dm, module = cli.datamodule, cli.model
    dm.setup("fit")
    module.build(dm.num_classes)
    model, task = module.model.to(device), module.task
    fed = next(c for c in cli.trainer.callbacks if isinstance(c, FederatedRound))
    fed.engine.bind(Population(tuple(dm.client_sizes), dm.batch_size))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    global_state = [p.detach().clone() for p in params]
    sizes = dm.client_sizes
    seed = resolve_seed(dm.seed)
    val = list(dm.splits.val)
    stamps = [clock()]
    to = (
        (lambda b: {k: v.to(device) if hasattr(v, "to") else v for k, v in b.items()})
        if device != "cpu"
        else (lambda b: b)
    )
    for r in range(1, cfg["federation"]["rounds"] + 1):
        plan = fed.engine.plan_for(r)
        by_client: dict[int, list] = {}
        for batch in RoundBatchSampler(plan, dm.client_indices, dm.batch_size, seed):
            by_client.setdefault(batch[0][0], []).append([i for _, i in batch])
        total = [torch.zeros_like(g) for g in global_state]
        weight = 0
        for client, batches in by_client.items():
            with torch.no_grad():
                for p, g in zip(params, global_state):
                    p.copy_(g)
            optimizer = torch.optim.AdamW(params, lr=module.lr, weight_decay=module.weight_decay)
            for indices in batches:
                batch = to(task.collate([dm.splits.train[i] for i in indices]))
                optimizer.zero_grad(set_to_none=True)
                task.step(model, batch).loss.backward()
                optimizer.step()
            with torch.no_grad():
                for t, p, g in zip(total, params, global_state):
                    t.add_(p - g, alpha=sizes[client])
            weight += sizes[client]
        with torch.no_grad():
            global_state = [g + t / weight for g, t in zip(global_state, total)]
            for p, g in zip(params, global_state):
                p.copy_(g)
            model.eval()
            correct = 0
            for i in range(0, len(val), dm.eval_batch_size):
                out = task.step(model, to(task.collate(val[i : i + dm.eval_batch_size])))
                correct += int((out.preds == out.target).sum())
            model.train()
        stamps.append(clock())
    rounds = [b - a for a, b in itertools.pairwise(stamps[1:])]
    return rounds, {n: g.cpu() for n, g in zip(names, global_state)}


def flower_rounds(cfg: dict, tmp: Path, threads: int, num_cpus: int) -> tuple[list[float], float] | str:
    exe = Path(sys.executable).parent / "fedlight-flower"
    if not exe.exists():
        return "fedlight-flower not installed (pip install -e plugins/fedlight-flower)"
    path, out = tmp / "flower.yaml", tmp / "flower-out"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with (tmp / "flower.log").open("w") as log:
        code = subprocess.call(
            [str(exe), "simulate", "--config", str(path), "--out", str(out), "--num-cpus", str(num_cpus)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    if code != 0:
        return f"fedlight-flower simulate failed ({code}); see {tmp / 'flower.log'}"
    rows = json.loads((out / "rounds.json").read_text())
    rounds = [float(r["round_time_s"]) for r in rows if int(float(r["round"])) > 1 and r.get("round_time_s")]
    return rounds, time.perf_counter() - t0 - sum(rounds)


class Stamp(tuple):
    """(wall, CPU) seconds; differences of stamps are round times."""

    wall = property(lambda self: self[0])
    cpu = property(lambda self: self[1])

    def __sub__(self, other):
        return Stamp((self[0] - other[0], self[1] - other[1]))


def clock() -> Stamp:
    # CPU time of this process: on a shared machine it is far steadier than wall time (one torch thread)
    return Stamp((time.perf_counter(), time.process_time()))


def mean(xs: list[float]) -> float:
    return sum(xs) / max(len(xs), 1)


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return (xs[n // 2] + xs[(n - 1) // 2]) / 2 if xs else float("nan")


def run_workload(name: str, cfg: dict, tmp: Path, args) -> list[str]:
    import torch

    device = "cuda" if cfg["trainer"]["accelerator"] == "cuda" else "cpu"
    executions = args.executions.split(",")
    plain: list[Stamp] = []
    fed: dict[str, list[Stamp]] = {e: [] for e in executions}
    fixed: dict[str, list[float]] = {e: [] for e in executions}
    diffs: dict[str, float] = {}
    for _ in range(args.repeat):  # A B C A B C: drift of a shared machine hits every engine alike
        rounds, plain_state = plain_rounds(copy.deepcopy(cfg), tmp, device)
        plain += rounds
        for execution in executions:
            run_cfg = copy.deepcopy(cfg)
            run_cfg["federation"]["execution"] = execution
            rounds, cost, cli = fedlight_rounds(run_cfg, tmp)
            fed[execution] += rounds
            fixed[execution].append(cost)
            state = _global_state(cli)
            diffs[execution] = max(float((state[k].float().cpu() - v).abs().max()) for k, v in plain_state.items())
            del cli
    fed_c = cfg["federation"]
    p_cpu, p_wall = median([r.cpu for r in plain]), median([r.wall for r in plain])
    flower = "not run (--flower)"
    if args.flower and device == "cpu":
        result = flower_rounds(copy.deepcopy(cfg), tmp, args.threads, args.num_cpus)
        flower = result if isinstance(result, str) else f"{median(result[0]):.3f} wall, fixed {result[1]:.0f} s"
    rows = []
    for execution in executions:
        f_cpu, f_wall = median([r.cpu for r in fed[execution]]), median([r.wall for r in fed[execution]])
        rows.append(
            f"| {name} | {cfg['data']['num_clients']} / {fed_c['clients_per_round']} | {p_cpu:.3f} ({p_wall:.3f}) "
            f"| {execution} | {f_cpu:.3f} ({f_wall:.3f}) | **{f_cpu / p_cpu:.2f}x** ({f_wall / p_wall:.2f}x) "
            f"| {min(fixed[execution]):.1f} | {flower} | {diffs[execution]:.2g} |"
        )
    if "central" in cfg:
        rows.append(centralized_row(cfg, tmp, p_wall, device))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def devices_rows(name: str, cfg: dict, tmp: Path, args) -> list[str]:
    """``fedlight fit`` as a subprocess on 1 and on N devices (``fedlight_ddp``, one process per device, each
    with ``--threads`` threads): the median ``round_time_s`` of rounds 2.. from each run's rounds.csv."""
    import csv

    execution = next((e for e in args.executions.split(",") if e != "steps"), "sequential")
    times: dict[int, float] = {}
    for devices in [int(d) for d in args.devices.split(",")]:
        run_cfg = copy.deepcopy(cfg)
        run_cfg["federation"]["execution"] = execution
        run_cfg["trainer"]["devices"] = devices
        if devices > 1:
            run_cfg["trainer"]["strategy"] = "fedlight_ddp"
        out = tmp / f"{name}-devices{devices}"
        run_cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(out / "runs")
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(run_cfg))
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        subprocess.run([sys.executable, "-m", "fedlight", "fit", "--config", str(out / "config.yaml")], env=env,
                       check=True, capture_output=True)  # fmt: skip
        (rounds_csv,) = list((out / "runs").rglob("rounds.csv"))
        with rounds_csv.open() as f:
            times[devices] = median([float(r["round_time_s"]) for r in csv.DictReader(f) if int(r["round"]) >= 2])
    base = times[min(times)]
    return [f"| {name} | {execution} | {d} | {t:.3f} | **{base / t:.2f}x** |" for d, t in times.items()]


def _global_state(cli):
    from fedlight.core.round import FederatedRound

    return next(c for c in cli.trainer.callbacks if isinstance(c, FederatedRound)).global_state


def centralized_row(cfg: dict, tmp: Path, sequential_round: float, device: str = "cuda") -> str:
    """ViT-B/16 + LoRA: one step of batch 8 x 16 = 128 vs the 8 sequential client steps of 16."""
    import torch

    size = cfg["central"]
    cli = build_cli(copy.deepcopy(cfg), tmp, "central")
    dm, module = cli.datamodule, cli.model
    dm.setup("fit")
    module.build(dm.num_classes)
    model, task = module.model.to(device), module.task
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=module.lr)
    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in task.collate(dm.splits.train[:size]).items()}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for _ in range(6):
        sync()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        task.step(model, batch).loss.backward()
        optimizer.step()
        sync()
        times.append(time.perf_counter() - t0)
    step = mean(times[1:])
    return f"| centralized batch 128 (one step) | - | {step:.3f} | - | {sequential_round / step:.2f}x slower (plain sequential) | - | - | - | - |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="vit100,vit1000,quickstart")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per run (the first is not timed)")
    parser.add_argument("--repeat", type=int, default=2, help="alternating plain/fedlight runs per workload")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (and OMP_NUM_THREADS)")
    parser.add_argument("--devices", default=None, help="e.g. 1,2: round time on 1 vs N CPU processes (fedlight_ddp) "
                        "instead of the engine table; on --device cuda, N GPUs")  # fmt: skip
    parser.add_argument("--executions", default="steps,sequential,grouped", help="federation.execution values to time")
    parser.add_argument("--flower", action="store_true", help="also run Flower simulation (slow: minutes)")
    parser.add_argument("--num-cpus", type=int, default=2, help="Ray CPUs for Flower simulation")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="cuda: the ViT-B/16 + LoRA workload only"
    )
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="simspeed-"))
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device on this machine; skipped")
            return
        workloads = {"cuda": cuda_config(tmp, args.rounds)}
    else:
        makers = {
            "vit100": lambda: vit_config(tmp, args.rounds, 100, 10),
            "vit1000": lambda: vit1000_config(tmp, args.rounds),
            "quickstart": lambda: quickstart_config(tmp, args.rounds),
        }
        workloads = {w: makers[w]() for w in args.workloads.split(",")}
    load = os.getloadavg()[0]
    print(
        f"{os.cpu_count()} CPUs, load {load:.1f} at start; torch threads {args.threads}; {args.rounds} rounds (first untimed)"
    )
    if args.devices:
        print("| workload | execution | devices | s/round (median round_time_s, rounds 2..) | speed-up vs 1 device |")
        print("|---|---|---:|---:|---:|")
        for name, cfg in workloads.items():
            for row in devices_rows(name, cfg, tmp, args):
                print(row, flush=True)
        print(f"load {os.getloadavg()[0]:.1f} at end; run dir {tmp}")
        return
    print("| workload | clients / per round | plain loop: CPU s/round (wall) | fedlight execution | fedlight: CPU s/round (wall) "
          "| fedlight / plain, CPU (wall) | fedlight fixed cost, wall s | Flower simulation, s/round | max abs diff vs plain |")  # fmt: skip
    print("|---|---|---:|---|---:|---:|---:|---|---:|")
    for name, cfg in workloads.items():
        for row in run_workload(name, cfg, tmp, args):
            print(row, flush=True)
    print(f"load {os.getloadavg()[0]:.1f} at end; run dir {tmp}")


if __name__ == "__main__":
    main()
