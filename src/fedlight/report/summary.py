"""Read run logs (``rounds.csv``, ``manifest.json``) and summarise runs as a markdown table.

``fedlight report RUN_DIR... [--out DIR] [--metric val_acc]`` prints the table and writes the plots of
:func:`fedlight.report.plots.render_report`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROUNDS_CSV = "rounds.csv"
MANIFEST_JSON = "manifest.json"
#: metrics where lower is better (matched as substrings of the column name)
LOWER_IS_BETTER = ("loss", "ppl", "perplexity", "error", "wer", "cer")
#: preferred metrics, in order, when none is asked for
PREFERRED_METRICS = ("val_acc", "val_f1", "val_exact_match", "val_rougeL", "val_token_acc", "val_ppl", "val_loss")


@dataclass
class Run:
    """One run's log directory: its ``rounds.csv`` rows (numbers or None) and its manifest, if any."""

    path: Path
    rows: list[dict[str, float | None]]
    columns: list[str]
    manifest: dict | None = None
    label: str = ""
    extra: dict = field(default_factory=dict)

    def values(self, column: str, *, training_only: bool = False) -> tuple[list[float], list[float]]:
        """(rounds, values) of a column where it has a value; round 0 dropped with ``training_only``."""
        xs, ys = [], []
        for row in self.rows:
            r, v = row.get("round"), row.get(column)
            if r is None or v is None or (training_only and r == 0):
                continue
            xs.append(r)
            ys.append(v)
        return xs, ys

    def has(self, column: str) -> bool:
        return any(row.get(column) is not None for row in self.rows)

    @property
    def training_rows(self) -> list[dict[str, float | None]]:
        return [r for r in self.rows if (r.get("round") or 0) > 0]


def _number(text: str | None) -> float | None:
    if text is None or text.strip() == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _round_order(row: dict[str, float | None]) -> float:
    """Sort key of a log row: its round, rows without one first."""
    value = row.get("round")
    return -1 if value is None else value


def find_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories: each path that holds a ``rounds.csv``, or every run found below it."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / ROUNDS_CSV).is_file():
            found.append(p)
        elif p.is_file() and p.name == ROUNDS_CSV:
            found.append(p.parent)
        elif p.is_dir():
            below = sorted(c.parent for c in p.rglob(ROUNDS_CSV))
            if not below:
                raise FileNotFoundError(f"no {ROUNDS_CSV} in or below {p}: is it a fedlight log directory?")
            found.extend(below)
        else:
            raise FileNotFoundError(f"{p} does not exist")
    return found


def run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """The dir name, or ``parent/name`` when names collide or are Lightning's uninformative ``version_N``."""
    names = [p.name for p in run_dirs]
    labels = []
    for p in run_dirs:
        ambiguous = names.count(p.name) > 1 or p.name.startswith("version_")
        labels.append(f"{p.parent.name}/{p.name}" if ambiguous and p.parent.name else p.name)
    return labels


def load_run(run_dir: str | Path, label: str | None = None) -> Run:
    """Parse ``rounds.csv`` (empty cells become None) and ``manifest.json`` when present."""
    run_dir = Path(run_dir)
    path = run_dir / ROUNDS_CSV
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a fedlight log directory?")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        rows = [{k: _number(v) for k, v in row.items() if k is not None} for row in reader]
    rows.sort(key=_round_order)
    manifest = None
    if (run_dir / MANIFEST_JSON).is_file():
        manifest = json.loads((run_dir / MANIFEST_JSON).read_text())
    return Run(run_dir, rows, columns, manifest, label or run_dir.name)


def load_runs(run_dirs: Sequence[str | Path]) -> list[Run]:
    dirs = [Path(p) for p in run_dirs]
    return [load_run(p, label) for p, label in zip(dirs, run_labels(dirs))]


def lower_is_better(metric: str) -> bool:
    return any(s in metric.lower() for s in LOWER_IS_BETTER)


def pick_metric(runs: Sequence[Run], metric: str | None = None) -> str:
    """The metric to report: the one asked for (it must exist), else the first preferred one present."""
    available = [c for c in dict.fromkeys(c for r in runs for c in r.columns) if c.startswith("val_")]
    if metric is not None:
        if not any(r.has(metric) for r in runs):
            raise ValueError(f"metric {metric!r} is in none of the runs; available: {available}")
        return metric
    for name in PREFERRED_METRICS:
        if any(r.has(name) for r in runs):
            return name
    for name in available:
        if any(r.has(name) for r in runs):
            return name
    raise ValueError("no val_* metric with values in these runs")


def best(run: Run, metric: str) -> tuple[float, float] | None:
    """(round, value) of the best value of ``metric`` over the training rounds (round 0 excluded)."""
    rounds, values = run.values(metric, training_only=True)
    if not values:
        return None
    pick = min if lower_is_better(metric) else max
    value = pick(values)
    return rounds[values.index(value)], value


def per_transfer_bytes(run: Run) -> float | None:
    """Bytes one client sends per round: the manifest's payload length, else estimated from the log."""
    if run.manifest and run.manifest.get("shared_bytes_per_round"):
        return float(run.manifest["shared_bytes_per_round"])
    estimates = []
    for r in run.training_rows:
        uplink, senders = r.get("uplink_bytes"), (r.get("num_clients") or 0) + (r.get("rejected") or 0)
        if uplink and senders > 0:
            estimates.append(uplink / senders)
    return sorted(estimates)[len(estimates) // 2] if estimates else None


def reduction(run: Run, full_model_bytes: int | None = None) -> float | None:
    """How many times fewer bytes a client sends per round than full fine-tuning (identity fp32) would."""
    full = full_model_bytes
    if full is None and run.manifest:
        full = run.manifest.get("full_model_bytes_per_round")
    sent = per_transfer_bytes(run)
    if not full or not sent:
        return None
    return full / sent


def format_mb(mb: float) -> str:
    if mb >= 1000:
        return f"{mb / 1000:.2f} GB"
    if mb >= 1:
        return f"{mb:.1f} MB"
    return f"{mb * 1000:.1f} kB"


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h {m:02d}m"
    if m:
        return f"{m}m {s:02d}s"
    return f"{s}s"


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def summary_rows(
    run_dirs: Sequence[str | Path], full_model_bytes: int | None = None, metric: str | None = None
) -> tuple[str, list[dict[str, str]]]:
    """(metric, one dict of formatted cells per run) — the data behind :func:`summary_table`."""
    runs = load_runs(run_dirs)
    metric = pick_metric(runs, metric)
    out = []
    for run in runs:
        training = run.training_rows
        _, values = run.values(metric, training_only=True)
        b = best(run, metric)
        last = training[-1] if training else (run.rows[-1] if run.rows else {})
        mb = last.get("cumulative_mb")
        eps_rounds, eps = run.values("epsilon", training_only=True)
        wall = sum(r.get("round_time_s") or 0.0 for r in run.rows)
        red = reduction(run, full_model_bytes)
        out.append(
            {
                "run": run.label,
                "rounds": str(len(training)),
                f"final {metric}": _fmt(values[-1] if values else None),
                f"best {metric}": "–" if b is None else f"{b[1]:.4f} (r{int(b[0])})",
                "total MB": "–" if mb is None else format_mb(mb),
                "vs full FT": "–" if red is None else f"{red:,.1f}× less",
                "final ε": _fmt(eps[-1] if eps else None, 2),
                "wall time": format_duration(wall) if wall else "–",
            }
        )
    return metric, out


def summary_table(
    run_dirs: Sequence[str | Path], full_model_bytes: int | None = None, metric: str | None = None
) -> str:
    """A markdown table, one row per run.

    Columns: run, rounds, final and best ``metric`` (best over rounds >= 1, with its round), total MB
    (uplink + downlink, all rounds), ``vs full FT`` = bytes a full fine-tuning client would send per
    round (``full_model_bytes``, else the run's ``manifest.json`` ``full_model_bytes_per_round``) divided
    by the bytes this run's clients send per round (the manifest's ``shared_bytes_per_round``, else
    estimated as uplink bytes per received update), final ε (– without DP) and wall time (sum of
    ``round_time_s``).
    """
    _, rows = summary_rows(run_dirs, full_model_bytes, metric)
    header = list(rows[0]) if rows else ["run"]
    right = {h for h in header if h != "run"}
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if h in right else "---" for h in header) + "|",
    ]
    lines += ["| " + " | ".join(row[h] for h in header) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``fedlight report RUN_DIR... [--out DIR] [--metric val_acc]``."""
    parser = argparse.ArgumentParser(
        prog="fedlight report",
        description="Plots and a summary table from fedlight run directories (each holds a rounds.csv).",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="log directories, or folders to search for them")
    parser.add_argument(
        "--out", type=Path, default=None, help="where plots go (default: RUN_DIR/report for one run, else ./report)"
    )
    parser.add_argument(
        "--metric", default=None, help="validation metric to plot and tabulate (default: val_acc if logged)"
    )
    parser.add_argument(
        "--format",
        dest="formats",
        action="append",
        choices=["png", "svg", "pdf"],
        help="repeatable; default png and svg",
    )
    parser.add_argument(
        "--full-model-bytes",
        type=int,
        default=None,
        help="bytes per round of full fine-tuning, when runs have no manifest.json",
    )
    parser.add_argument("--no-plots", action="store_true", help="only print the table")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run_dirs = find_run_dirs(args.run_dirs)
        table = summary_table(run_dirs, args.full_model_bytes, args.metric)
    except (FileNotFoundError, ValueError) as err:
        print(f"fedlight report: error: {err}", file=sys.stderr)
        return 2
    print(table)
    if not args.no_plots:
        from fedlight.report.plots import render_report  # matplotlib: ~1 s of import, only when plotting

        out = args.out or (run_dirs[0] / "report" if len(run_dirs) == 1 else Path("report"))
        written = render_report(run_dirs, out, tuple(args.formats or ("png", "svg")), metric=args.metric)
        print()
        for path in written:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
