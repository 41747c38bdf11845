"""Hash the final model and rounds.csv rows of 13 feature configs (tiny ViT on digits, 2 rounds).

A behaviour check for refactors: run it at two commits (``PYTHONPATH=<checkout>/src``, one thread) or
with ``GOLDEN_EXECUTION=sequential`` against the default; equal hashes mean bit-identical runs.

    OMP_NUM_THREADS=1 python scripts/golden_hashes.py /tmp/golden [case ...]
"""

import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("FEDLIGHT_DISABLE_PLUGIN_AUTOLOAD", "1")
import torch

torch.set_num_threads(1)
sys.path.insert(0, os.environ.get("GOLDEN_TESTS", str(Path(__file__).resolve().parents[1] / "tests")))
from conftest import merge, round_callback, run_fit, vision_config  # noqa: E402 - tests/ on the path first


def FED(**kw):  # noqa: N802 - reads like a section name in CASES
    return {"federation": {"rounds": 2, "clients_per_round": 2, "local_steps": 2, "checkpoint_every": 0, **kw}}


UNI = {"class_path": "fedavg", "init_args": {"weighting": "uniform"}}
CASES = {
    "base": {},
    "int8_ef": FED(uplink_codec={"class_path": "int8", "init_args": {"error_feedback": True}}),
    "fedadam": FED(aggregator="fedadam"),
    "scaffold": {
        **FED(client_method="scaffold"),
        "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}},
    },
    "fedprox": FED(client_method={"class_path": "fedprox", "init_args": {"mu": 0.1}}),
    "secagg": FED(secure_aggregation={"threshold": 0.5}, aggregator=UNI),
    "fedex": FED(aggregator="fedex_lora"),
    "attack": {**FED(attack="sign_flip", malicious_fraction=0.25, aggregator="median"), "data": {"num_clients": 4}},
    "dp_fedavg": FED(
        privacy={"class_path": "dp_fedavg", "init_args": {"noise_multiplier": 1.0, "clip_norm": 0.5}}, aggregator=UNI
    ),
    "personal": {
        **FED(personal_eval_every=1),
        "model": {"peft": {"class_path": "lora", "init_args": {"r": 2, "head": "local"}}},
    },
    "tiers_faults": FED(compute_tiers={"fractions": [1.0, 0.5]}, faults={"dropout_after": 0.3}, clients_per_round=3),
    "dp_sgd": FED(privacy={"class_path": "dp_sgd", "init_args": {"noise_multiplier": 0.8, "max_grad_norm": 1.0}}),
    "hetlora": FED(aggregator={"class_path": "hetlora", "init_args": {"rank_tiers": [1, 2]}}),
}


def digest(cli):
    cb = round_callback(cli)
    h = hashlib.sha256()
    model = cli.model.model
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    rows = [{k: v for k, v in r.items() if k != "round_time_s"} for r in cb.history]
    h.update(json.dumps(rows, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


out = {}
root = Path(sys.argv[1])
only = sys.argv[2:] or list(CASES)
for name in only:
    over = CASES[name]
    cfg = vision_config(root / name, **{k: v for k, v in over.items()})
    cfg = merge(cfg, FED()) if "federation" not in over else cfg
    if os.environ.get("GOLDEN_EXECUTION"):
        cfg["federation"]["execution"] = os.environ["GOLDEN_EXECUTION"]
    try:
        cli = run_fit(cfg, root / name)
        out[name] = digest(cli)
    except Exception as err:  # noqa
        out[name] = f"ERROR {type(err).__name__}: {str(err)[:200]}"
    print(name, out[name], flush=True)
print(json.dumps(out, indent=1))
