"""What a run writes for people and tools: ``rounds.csv`` (one row per round) and ``samples.jsonl``."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from fedlight.core.storage import append_text, atomic_write_text

ROUNDS_CSV = "rounds.csv"
SAMPLES = "samples.jsonl"
MB = 1e6
#: leading columns of rounds.csv; task metrics (val_*) and others follow in first-seen order
CSV_COLUMNS = (
    "round",
    "num_clients",
    "rejected",
    "dropped",
    "failed",
    "uplink_bytes",
    "downlink_bytes",
    "cumulative_mb",
    "train_loss",
)


class RunLog:
    """Rewrites rounds.csv atomically after every round and appends the round's generations to samples.jsonl."""

    def __init__(self, directory: Path, enabled: bool = True) -> None:
        self.directory = Path(directory)
        self.enabled = enabled  # only one process (rank 0) writes

    def write(self, history: list[dict[str, Any]], module: Any, round_idx: int) -> None:
        if not self.enabled:
            return
        write_csv(history, self.directory / ROUNDS_CSV)
        samples = getattr(module, "last_samples", None)
        if samples:
            write_samples(samples, self.directory / SAMPLES, round_idx)

    @staticmethod
    def summary(engine: Any) -> str:
        rows = [r for r in engine.history if r["round"] > 0]
        if not rows:
            return "[fedlight] no rounds completed"
        metric = next((k for k in ("val_acc", "val_f1", "val_loss") if k in rows[-1]), None)
        text = f"[fedlight] {len(rows)} rounds"
        if metric:
            first = engine.history[0].get(metric)
            best = max(rows, key=lambda r: r.get(metric, float("-inf")) * (-1 if metric == "val_loss" else 1))
            text += f" | {metric}: round 0 {first:.4f} -> final {rows[-1][metric]:.4f}" if first is not None else ""
            text += f" (best {best[metric]:.4f} @ round {best['round']})"
        up, down = engine.total_uplink, engine.total_downlink
        return text + f" | uplink {up / MB:.3f} MB, downlink {down / MB:.3f} MB, total {(up + down) / MB:.3f} MB"


def write_csv(history: list[dict[str, Any]], path: Path) -> None:
    """All rows so far, written to a temporary file and renamed: a reader never sees a half-written file."""
    columns: list[str] = list(CSV_COLUMNS)
    for r in history:
        columns.extend(k for k in r if k not in columns)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, text.getvalue())  # a full or read-only disk: a StorageError naming the path


def write_samples(samples: list[Any], path: Path, round_idx: int) -> None:
    """A few generations of the global model per round, for a person to read (generative tasks, evaluators)."""
    lines = []
    for sample in samples:  # the task's (prompt, generation, reference) triples, evaluators' dicts
        if isinstance(sample, dict):
            record = {"round": round_idx, **sample}
        else:
            prompt, generation, reference = sample
            record = {"round": round_idx, "prompt": prompt, "generation": generation, "reference": reference}
        lines.append(json.dumps(record, ensure_ascii=False, default=str) + "\n")
    append_text(path, "".join(lines))  # all of a round's lines or none
