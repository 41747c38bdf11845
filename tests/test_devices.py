"""Several devices: a round's clients spread over DDP ranks (``trainer.strategy: fedlight_ddp``) give the
one-device result; what cannot be spread is refused before round 1 with what to use instead."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import round_callback, run_fit, vision_config

from fedlight.core.distributed import assign_ranks
from fedlight.core.plan import RoundPlan
from fedlight.errors import ConfigError


def _plan(steps: list[int]) -> RoundPlan:
    clients = tuple(range(100, 100 + len(steps)))
    return RoundPlan(round=1, clients=clients, training=clients, steps=tuple(steps))


@pytest.mark.parametrize("seed", range(20))
def test_rank_assignment_is_a_balanced_deterministic_partition_in_plan_order(seed):
    rng = np.random.default_rng(seed)
    steps = [int(s) for s in rng.integers(1, 12, size=int(rng.integers(2, 30)))]
    world = int(rng.integers(2, min(8, len(steps)) + 1))
    ranks = assign_ranks(_plan(steps), world)
    assert ranks == assign_ranks(_plan(steps), world)
    assert sorted(k for r in ranks for k in r) == list(range(len(steps)))  # every client exactly once
    assert all(r == sorted(r) and r for r in ranks)  # plan order within a rank, nobody idle
    loads = [sum(steps[k] for k in r) for r in ranks]
    assert max(loads) - min(loads) <= max(steps)  # greedy longest-first: within one client's steps


def _trainer(devices: int = 2, strategy: str = "fedlight_ddp", num_nodes: int = 1):
    import lightning.pytorch as pl

    return pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, num_nodes=num_nodes, logger=False)


REFUSED = [
    ("fedlight_ddp 2 nodes", {"execution": "sequential"}, "several nodes are not supported"),
    ("ddp", {"execution": "sequential"}, "set trainer.strategy: fedlight_ddp"),
    ("fsdp", {"execution": "sequential"}, "set trainer.strategy: fedlight_ddp"),
    ("fedlight_ddp", {"execution": "steps"}, "set federation.execution: sequential or grouped"),
    ("fedlight_ddp", {"execution": "grouped", "clients_per_round": 1}, r"clients_per_round \(1\) is less than the 2 ranks"),
    ("fedlight_ddp", {"execution": "sequential", "privacy": "dp_sgd"}, "counts private steps on the rank"),
    ("fedlight_ddp", {"execution": "sequential", "secure_aggregation": {"threshold": 0.5}}, "draws each party's secrets"),
]  # fmt: skip


@pytest.mark.parametrize(("strategy", "federation", "match"), REFUSED)
def test_what_cannot_be_spread_over_devices_is_refused_with_what_to_use(tmp_path, strategy, federation, match):
    from conftest import build_cli

    from fedlight.core.round_callbacks import check_devices

    cfg = vision_config(tmp_path, federation={"rounds": 1, "clients_per_round": 2, "local_steps": 1, **federation})
    if "secure_aggregation" in federation:
        cfg["federation"]["aggregator"] = {"class_path": "fedavg", "init_args": {"weighting": "uniform"}}
    options = round_callback(build_cli(cfg, tmp_path)).options
    if strategy == "fsdp" and not torch.cuda.is_available():
        strategy = "ddp_spawn"  # FSDP needs CUDA; any strategy other than fedlight_ddp is refused the same way
    nodes = 2 if strategy.endswith("2 nodes") else 1
    with pytest.raises(ConfigError, match=match):
        check_devices(_trainer(strategy=strategy.split()[0], num_nodes=nodes), options)


def _subprocess_fit(cfg: dict, tmp_path: Path) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-m", "fedlight", "fit", "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (log_dir,) = {p.parent for p in (tmp_path / "runs").rglob("rounds.csv")}
    return log_dir


def _engine_state(log_dir: Path) -> dict:
    from fedlight.core.checkpoint import AtomicCheckpointIO

    checkpoint = AtomicCheckpointIO().load_checkpoint(log_dir / "checkpoints" / "last.ckpt")  # pickle-free
    return next(v for v in checkpoint["callbacks"].values() if isinstance(v, dict) and "global_state" in v)


def _rows(log_dir: Path) -> list[dict]:
    with (log_dir / "rounds.csv").open() as f:
        return [{k: v for k, v in row.items() if k != "round_time_s"} for row in csv.DictReader(f)]


def _max_diff(a, b) -> float:
    if isinstance(a, torch.Tensor):
        return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
    if isinstance(a, dict):
        assert sorted(a, key=str) == sorted(b, key=str)
        return max((_max_diff(a[k], b[k]) for k in a), default=0.0)
    return 0.0


SPREAD = {
    "sequential: int8 + error feedback, median vs alie attackers, FedSA-LoRA's local B": (
        {"execution": "sequential", "uplink_codec": {"class_path": "int8", "init_args": {"error_feedback": True}},
         "aggregator": "median", "attack": "alie", "malicious_fraction": 0.25},
        {"peft": {"class_path": "fedsa_lora", "init_args": {"r": 2}}}, 0.0,
    ),
    "grouped: dp_fedavg, compute tiers": pytest.param(
        {"execution": "grouped", "compute_tiers": {"fractions": [1.0, 0.34]},
         "privacy": {"class_path": "dp_fedavg", "init_args": {"noise_multiplier": 0.5, "clip_norm": 0.5}},
         "aggregator": {"class_path": "fedavg", "init_args": {"weighting": "uniform"}}},
        {}, 2e-5, marks=pytest.mark.slow,
    ),
}  # fmt: skip


@pytest.mark.parametrize(("federation", "model", "atol"), list(SPREAD.values()), ids=list(SPREAD))
def test_two_cpu_devices_give_the_one_device_round(tmp_path, federation, model, atol):
    """Bit for bit with sequential execution: the same clients train on the same batches from the same
    start, and every rank aggregates the same updates in plan order. Grouped: one group of 4 on one
    device vs two groups of 2 (batched kernels of other sizes round differently)."""
    fed = {"rounds": 2, "clients_per_round": 4, "local_steps": 3, "checkpoint_every": 1, **federation}
    cfg = vision_config(tmp_path / "one", federation=fed, model=model)
    cfg["optimizer"] = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank's process (OMP_NUM_THREADS=1): kernels round alike
    try:
        one = round_callback(run_fit(cfg, tmp_path / "one"))
    finally:
        torch.set_num_threads(threads)
    (one_dir,) = {p.parent for p in (tmp_path / "one" / "runs").rglob("rounds.csv")}
    two_cfg = vision_config(tmp_path / "two", federation=fed, model=model)
    two_cfg["optimizer"] = cfg["optimizer"]
    two_cfg["trainer"].update(devices=2, strategy="fedlight_ddp")
    two_dir = _subprocess_fit(two_cfg, tmp_path / "two")
    one_state, two_state = _engine_state(one_dir), _engine_state(two_dir)
    assert _max_diff(one_state["global_state"], two_state["global_state"]) <= atol
    assert _max_diff(one_state["client_store"], two_state["client_store"]) <= atol
    assert _max_diff(one.global_state, two_state["global_state"]) <= atol
    one_rows, two_rows = _rows(one_dir), _rows(two_dir)
    assert [r["uplink_bytes"] for r in one_rows] == [r["uplink_bytes"] for r in two_rows]  # counted once each
    assert [r["num_clients"] for r in one_rows] == [r["num_clients"] for r in two_rows]
    if atol == 0.0:
        assert one_rows == two_rows
    assert (two_dir / "manifest.json").is_file() and not list(two_dir.parent.glob("version_1"))  # written once
