"""``benchmarks/simulation_speed.py``'s GPU workload (ViT-B/16 + LoRA, 8 clients x batch 16 vs one
centralized batch of 128) runs on CPU here with a tiny ViT in place of ViT-B/16, so the path a GPU
machine would take (config, plain loop, every execution, the centralized step, the table row) is
exercised without one; only ``.to("cuda")`` and the synchronisation differ there.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = {"model": "vit_tiny_patch16_224", "image_size": 16,
        "model_kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}}  # fmt: skip


@pytest.fixture
def simulation_speed():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("simulation_speed")
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.slow
def test_the_gpu_workload_runs_every_execution_and_the_centralized_step_on_cpu(simulation_speed, tmp_path):
    cfg = simulation_speed.cuda_config(tmp_path, rounds=3, device="cpu", task=TINY)
    assert cfg["data"]["batch_size"] == 16 and cfg["federation"]["clients_per_round"] == 8
    assert cfg["model"]["peft"]["class_path"] == "lora" and cfg["central"] == 128
    args = argparse.Namespace(executions="sequential,grouped", repeat=1, flower=False, threads=1, num_cpus=1)
    rows = simulation_speed.run_workload("cuda-on-cpu", cfg, tmp_path, args)
    assert len(rows) == 3 and rows[-1].startswith("| centralized batch 128 (one step) |")
    for row, execution in zip(rows, ("sequential", "grouped"), strict=False):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[3] == execution
        assert float(cells[5].strip("*").split("x")[0]) > 0  # fedlight / plain
        assert float(cells[-1]) < 1e-3  # the same training as the plain loop (fp32 vs fp64 FedAvg, batching)
