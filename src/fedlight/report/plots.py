"""Plots of one or several runs from their ``rounds.csv`` (matplotlib, Agg backend: no display needed).

:func:`render_report` writes, for the chosen validation metric (``val_acc`` by default):

* ``<metric>_vs_round`` — the metric per round (round 0 is the model before any training);
* ``<metric>_vs_mb`` — the same against cumulative communication (uplink + downlink, MB), the
  accuracy-for-bytes view PEFT is about (log x-axis when runs differ by more than 30×);
* ``loss_vs_round`` — validation (solid) and mean client training loss (dashed);
* ``epsilon_vs_round`` — privacy spent, when a run logged ε;
* ``client_<m>_spread`` — mean ± std (and min/max) across clients, when columns such as
  ``client_acc_mean`` / ``client_acc_std`` exist;
* ``overview`` — all of the above as panels of one figure.

Several runs are overlaid, one colour each, with a legend.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedlight.report.summary import Run, load_runs, lower_is_better, pick_metric  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

_NAMES = {
    "acc": "accuracy",
    "f1": "macro-F1",
    "loss": "loss",
    "ppl": "perplexity",
    "exact_match": "exact match",
    "rougeL": "ROUGE-L",
    "token_acc": "token accuracy",
}
_CLIENT_STAT = re.compile(r"^client_(.+)_mean$")
_STYLE: dict[RcKeyType, Any] = {
    "figure.dpi": 110,
    "savefig.dpi": 150,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 12,
    "axes.titleweight": "bold",
    "axes.labelsize": 10.5,
    "legend.fontsize": 9,
    "legend.framealpha": 0.85,
}


def pretty_metric(metric: str) -> str:
    """``val_acc`` -> ``validation accuracy``; unknown names stay as they are (minus the prefix)."""
    prefix, _, rest = metric.partition("_")
    if prefix in ("val", "test", "train") and rest:
        where = {"val": "validation", "test": "test", "train": "training"}[prefix]
        return f"{where} {_NAMES.get(rest, rest.replace('_', ' '))}"
    return _NAMES.get(metric, metric.replace("_", " "))


def _colors(n: int) -> list:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _marker(points: int) -> dict:
    return {"marker": "o", "markersize": 3.5} if points <= 40 else {}


def _legend(ax: Axes, runs: Sequence[Run], force: bool = False) -> None:
    _, labels = ax.get_legend_handles_labels()
    if labels and (len(runs) > 1 or force):
        ax.legend()


def _round_axis(ax: Axes) -> None:
    ax.set_xlabel("round (0 = before training)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def draw_metric_vs_round(ax: Axes, runs: Sequence[Run], metric: str) -> bool:
    for run, color in zip(runs, _colors(len(runs))):
        xs, ys = run.values(metric)
        if xs:
            ax.plot(xs, ys, color=color, label=run.label, **_marker(len(xs)))
    _round_axis(ax)
    ax.set_ylabel(pretty_metric(metric))
    better = "lower" if lower_is_better(metric) else "higher"
    ax.set_title(f"{pretty_metric(metric).capitalize()} per round ({better} is better)")
    _legend(ax, runs)
    return True


def draw_metric_vs_mb(ax: Axes, runs: Sequence[Run], metric: str) -> bool:
    finals = [r.rows[-1].get("cumulative_mb") or 0 for r in runs if r.rows]
    positive = [v for v in finals if v > 0]
    log = len(positive) > 1 and max(positive) / min(positive) > 30
    for run, color in zip(runs, _colors(len(runs))):
        pts = [
            (mb, value)
            for row in run.rows
            if (mb := row.get("cumulative_mb")) is not None
            and (value := row.get(metric)) is not None
            and (not log or mb > 0)
        ]
        if pts:
            ax.plot(*zip(*pts), color=color, label=run.label, **_marker(len(pts)))
    if log:
        ax.set_xscale("log")
    ax.set_xlabel("cumulative communication, uplink + downlink (MB" + (", log scale)" if log else ")"))
    ax.set_ylabel(pretty_metric(metric))
    ax.set_title(f"{pretty_metric(metric).capitalize()} vs. bytes sent")
    _legend(ax, runs)
    return True


def draw_losses(ax: Axes, runs: Sequence[Run]) -> bool:
    drew = False
    for run, color in zip(runs, _colors(len(runs))):
        for column, style, what in (("val_loss", "-", "validation"), ("train_loss", "--", "training (client mean)")):
            xs, ys = run.values(column)
            if xs:
                # several runs: colour = run (solid line labelled), line style = which loss (grey keys below)
                label = what if len(runs) == 1 else (run.label if style == "-" else None)
                ax.plot(xs, ys, style, color=color, label=label, **_marker(len(xs)))
                drew = True
    if len(runs) > 1:
        ax.plot([], [], "-", color="grey", label="validation")
        ax.plot([], [], "--", color="grey", label="training (client mean)")
    _round_axis(ax)
    ax.set_ylabel("loss")
    ax.set_title("Loss per round (solid: validation, dashed: training)")
    _legend(ax, runs, force=True)
    return drew


def draw_epsilon(ax: Axes, runs: Sequence[Run]) -> bool:
    drew = False
    for run, color in zip(runs, _colors(len(runs))):
        xs, ys = run.values("epsilon")
        if xs:
            ax.plot(xs, ys, color=color, label=run.label, **_marker(len(xs)))
            drew = True
    _round_axis(ax)
    ax.set_ylabel("ε (privacy spent)")
    ax.set_title("Privacy budget ε per round")
    _legend(ax, runs)
    return drew


def client_stats(runs: Sequence[Run]) -> list[str]:
    """Per-client statistics logged as ``client_<m>_mean`` (with ``_std``/``_min``/``_max``)."""
    found = []
    for run in runs:
        for column in run.columns:
            m = _CLIENT_STAT.match(column)
            if m and run.has(column) and m.group(1) not in found:
                found.append(m.group(1))
    return found


def draw_client_spread(ax: Axes, runs: Sequence[Run], stat: str) -> bool:
    drew = False
    for run, color in zip(runs, _colors(len(runs))):
        xs, mean = run.values(f"client_{stat}_mean")
        if not xs:
            continue
        drew = True
        label = run.label if len(runs) > 1 else "mean across clients"
        ax.plot(xs, mean, color=color, label=label, **_marker(len(xs)))
        std = dict(zip(*run.values(f"client_{stat}_std")))
        if std:
            lo = [m - std.get(x, 0.0) for x, m in zip(xs, mean)]
            hi = [m + std.get(x, 0.0) for x, m in zip(xs, mean)]
            ax.fill_between(xs, lo, hi, color=color, alpha=0.2, lw=0, label="± 1 std" if len(runs) == 1 else None)
        for bound in ("min", "max"):
            bx, by = run.values(f"client_{stat}_{bound}")
            if bx:
                first = bound == "min" and len(runs) == 1
                ax.plot(bx, by, ":", color=color, lw=1, label="min / max" if first else None)
    _round_axis(ax)
    name = _NAMES.get(stat, stat.replace("_", " "))
    ax.set_ylabel(f"per-client {name}")
    ax.set_title(f"Per-client {name}: spread across clients")
    _legend(ax, runs, force=True)
    return drew


def _panels(runs: Sequence[Run], metric: str) -> list[tuple[str, Callable[[Axes], bool]]]:
    """(file stem, drawer) of every plot these runs have data for, in report order."""
    panels: list[tuple[str, Callable[[Axes], bool]]] = [
        (f"{metric}_vs_round", lambda ax: draw_metric_vs_round(ax, runs, metric)),
        (f"{metric}_vs_mb", lambda ax: draw_metric_vs_mb(ax, runs, metric)),
    ]
    if any(r.has("val_loss") or r.has("train_loss") for r in runs) and metric != "val_loss":
        panels.append(("loss_vs_round", lambda ax: draw_losses(ax, runs)))
    if any(r.has("epsilon") for r in runs):
        panels.append(("epsilon_vs_round", lambda ax: draw_epsilon(ax, runs)))
    for stat in client_stats(runs):
        panels.append((f"client_{stat}_spread", partial(draw_client_spread, runs=runs, stat=stat)))
    return panels


def _save(fig, out_dir: Path, stem: str, formats: Sequence[str]) -> list[Path]:
    paths = []
    for fmt in formats:
        path = out_dir / f"{stem}.{fmt}"
        fig.savefig(path, bbox_inches="tight", metadata={"Software": "fedlight"} if fmt == "png" else None)
        paths.append(path)
    plt.close(fig)
    return paths


def render_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    formats: Sequence[str] = ("png", "svg"),
    metric: str | None = None,
) -> list[Path]:
    """Draw every plot the runs have data for into ``out_dir``; returns the written files.

    Runs are labelled by directory name (``parent/name`` for Lightning's ``version_N`` dirs or when
    names collide). ``metric`` defaults to ``val_acc`` (else the first logged ``val_*`` metric).
    """
    runs = load_runs(run_dirs)
    if not runs:
        raise ValueError("no runs to plot")
    metric = pick_metric(runs, metric)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    panels = _panels(runs, metric)
    written: list[Path] = []
    with plt.rc_context(_STYLE):
        for stem, draw in panels:
            fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
            draw(ax)
            written += _save(fig, out_dir, stem, formats)
        cols = 2
        rows = (len(panels) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(12, 4.2 * rows), layout="constrained", squeeze=False)
        for ax, (_, draw) in zip(axes.flat, panels):
            draw(ax)
        for ax in list(axes.flat)[len(panels) :]:
            ax.set_visible(False)
        title = runs[0].label if len(runs) == 1 else f"{len(runs)} runs"
        fig.suptitle(f"fedlight report: {title}", fontsize=14, fontweight="bold")
        written += _save(fig, out_dir, "overview", formats)
    return written
