"""Bytes per client of the client-state store, measured on real runs with 1,000 clients.

Three kinds of per-client state (tiny ViT + LoRA r=2 on digits, 1,000 clients, 100 per round):
local heads (``lora head: local``), error-feedback residuals (``int8`` uplink with ``error_feedback``)
and SCAFFOLD control variates. For each, after the run: how many clients the store holds, the bytes
of each client's entry (distinct tensor storages, so a view is not counted twice), what that client's
own tensors are expected to cost (the local tensors, or one fp32 copy of the shared state), whether
any stored tensor shares memory with the model, and the model's own bytes (frozen backbone + trainable,
held once per process however many clients there are).

    OMP_NUM_THREADS=1 python benchmarks/client_state_memory.py [--clients 1000] [--per-round 100] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import yaml

os.environ.setdefault("FEDLIGHT_DISABLE_PLUGIN_AUTOLOAD", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

LORA = {"class_path": "lora", "init_args": {"r": 2}}
CASES = {
    "local heads (lora, head: local)": ({"peft": {"class_path": "lora", "init_args": {"r": 2, "head": "local"}}}, {}, "local"),
    "error-feedback residuals (int8)": (
        {"peft": LORA}, {"uplink_codec": {"class_path": "int8", "init_args": {"error_feedback": True}}}, "residual"
    ),
    "SCAFFOLD controls": ({"peft": LORA}, {"client_method": "scaffold"}, "control"),
}


def storages(tensors) -> dict[int, int]:
    """data pointer -> bytes of each distinct storage."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from flower_vs_inprocess import config

    from fedlight.cli import run_cli
    from fedlight.core.round import FederatedRound

    print(f"{args.clients} clients, {args.per_round} per round, {args.rounds} rounds, 1 local step; tiny ViT + LoRA r=2")
    print("| client state | clients stored | bytes per client (min-max) | expected (own tensors) | shares memory with the model "
          "| store total | model (backbone + trainable) |")  # fmt: skip
    print("|---|---:|---:|---:|---|---:|---:|")
    for label, (model_over, fed_over, key) in CASES.items():
        tmp = Path(tempfile.mkdtemp())
        cfg = config(tmp, args.rounds, args.clients, args.per_round, 1)
        cfg["trainer"]["logger"] = False
        cfg["data"]["partitioner"] = {"class_path": "iid"}  # 1,437 images: 1-2 per client
        cfg["model"].update(model_over)
        cfg["federation"].update(fed_over)
        if "client_method" in fed_over:
            cfg["optimizer"] = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}}
        (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
        cli = run_cli(["fit", "--config", str(tmp / "c.yaml")])
        fed = next(c for c in cli.trainer.callbacks if isinstance(c, FederatedRound))
        model = cli.model.model
        model_storages = storages(list(model.parameters()) + list(model.buffers()))
        engine = fed.engine
        own = engine.local_names if key == "local" else engine.shared_names
        params = dict(model.named_parameters())
        expected = sum(params[n].numel() * (params[n].element_size() if key == "local" else 4) for n in own)
        per_client, shared = [], False
        for entry in fed.client_store.values():
            tensors = [t for part in entry.values() for t in part.values()]
            s = storages(tensors)
            shared |= bool(set(s) & set(model_storages))
            per_client.append(sum(s.values()))
        with_key = sum(1 for e in fed.client_store.values() if key in e)
        print(
            f"| {label} | {with_key} | {min(per_client)}-{max(per_client)} | {expected} | {'yes' if shared else 'no'} "
            f"| {sum(per_client) / 1e6:.3f} MB | {sum(model_storages.values()) / 1e6:.3f} MB |",
            flush=True,
        )


if __name__ == "__main__":
    main()
