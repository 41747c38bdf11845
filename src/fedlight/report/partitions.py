"""Per-client label histograms of a partition: counts, a text table with a skew summary, a stacked-bar plot.

The skew statistic is the mean over clients of the total-variation distance between the client's label
distribution and the pooled one, ``TV_k = ½ Σ_c |p_k(c) − p(c)|``: 0 for a perfectly IID split, close to
``1 − 1/C``-ish when every client sees one class. It is what the partitioner tests use to show that
``dirichlet(alpha=0.1)`` is far more skewed than ``dirichlet(alpha=100)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def label_histograms(client_indices: Sequence[np.ndarray], labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``(num_clients, num_classes)`` int64 counts: row k counts the labels of client k's examples."""
    labels = np.asarray(labels, dtype=np.int64)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    out = np.zeros((len(client_indices), num_classes), dtype=np.int64)
    for k, idx in enumerate(client_indices):
        out[k] = np.bincount(labels[np.asarray(idx, dtype=np.int64)], minlength=num_classes)
    return out


def tv_distances(histograms: np.ndarray) -> np.ndarray:
    """Per-client total-variation distance between its label distribution and the pooled one."""
    h = np.asarray(histograms, dtype=np.float64)
    sizes = h.sum(1, keepdims=True)
    pooled = h.sum(0) / max(h.sum(), 1.0)
    p = np.divide(h, sizes, out=np.zeros_like(h), where=sizes > 0)
    return 0.5 * np.abs(p - pooled).sum(1)


def skew_summary(histograms: np.ndarray) -> dict[str, float]:
    """Label skew (mean/max TV distance, classes per client) and quantity skew (sizes, their CV)."""
    h = np.asarray(histograms)
    sizes = h.sum(1).astype(np.float64)
    tv = tv_distances(h)
    classes = (h > 0).sum(1)
    return {
        "clients": float(len(h)),
        "examples": float(sizes.sum()),
        "mean_tv": float(tv.mean()),
        "max_tv": float(tv.max()),
        "mean_classes": float(classes.mean()),
        "min_classes": float(classes.min()),
        "min_size": float(sizes.min()),
        "mean_size": float(sizes.mean()),
        "max_size": float(sizes.max()),
        "size_cv": float(sizes.std() / sizes.mean()) if sizes.mean() > 0 else 0.0,
    }


def format_histograms(histograms: np.ndarray, label_names: Sequence[str] | None = None, max_columns: int = 12) -> str:
    """A text table, one row per client (size, per-class counts, #classes, TV), then a skew summary.

    With more than ``max_columns`` classes the per-class columns are replaced by each client's top 3
    classes with their shares.
    """
    h = np.asarray(histograms)
    num_classes = h.shape[1]
    names = [str(n) for n in (label_names or range(num_classes))]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} label names for {num_classes} classes")
    tv = tv_distances(h)
    wide = num_classes <= max_columns
    header = ["client", "n", *(names if wide else ["top classes"]), "classes", "tv"]
    rows = []
    for k, row in enumerate(h):
        n = int(row.sum())
        if wide:
            cells = [str(int(c)) for c in row]
        else:
            top = np.argsort(-row, kind="stable")[:3]
            cells = [" ".join(f"{names[c]}:{row[c] / max(n, 1):.0%}" for c in top if row[c] > 0)]
        rows.append([str(k), str(n), *cells, str(int((row > 0).sum())), f"{tv[k]:.2f}"])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    left = set() if wide else {2}  # the free-text "top classes" column

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    s = skew_summary(h)
    summary = (
        f"{int(s['clients'])} clients, {int(s['examples'])} examples; "
        f"sizes min/mean/max {s['min_size']:.0f}/{s['mean_size']:.1f}/{s['max_size']:.0f} (CV {s['size_cv']:.2f}); "
        f"classes per client mean {s['mean_classes']:.1f} (min {s['min_classes']:.0f}) of {num_classes}; "
        f"label skew: mean TV {s['mean_tv']:.3f}, max {s['max_tv']:.3f} (0 = IID)"
    )
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows), "", summary])


def plot_histograms(
    histograms: np.ndarray, path: str | Path, label_names: Sequence[str] | None = None, title: str | None = None
) -> Path:
    """Stacked bars of per-client label counts (one colour per class), saved to ``path``; returns the path."""
    import matplotlib

    matplotlib.use("Agg")  # never needs a display
    import matplotlib.pyplot as plt

    h = np.asarray(histograms)
    num_clients, num_classes = h.shape
    names = [str(n) for n in (label_names or range(num_classes))]
    cmap = plt.get_cmap("tab20" if num_classes > 10 else "tab10")
    fig, ax = plt.subplots(figsize=(min(max(6.0, 0.3 * num_clients + 2), 24.0), 4.0))
    x = np.arange(num_clients)
    bottom = np.zeros(num_clients)
    for c in range(num_classes):
        ax.bar(x, h[:, c], bottom=bottom, width=0.85, color=cmap(c % cmap.N), label=names[c], linewidth=0)
        bottom += h[:, c]
    ax.set_xlabel("client")
    ax.set_ylabel("examples")
    s = skew_summary(h)
    ax.set_title(title or f"label histogram per client (mean TV {s['mean_tv']:.2f}, size CV {s['size_cv']:.2f})")
    if num_clients <= 40:
        ax.set_xticks(x)
    if num_classes <= 20:
        ax.legend(title="class", bbox_to_anchor=(1.01, 1), loc="upper left", fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- what `fedlight partitions` shows ------------------------------------------------------------------


def partition_histograms(datamodule) -> tuple[np.ndarray, list[str], str]:
    """Per-client histograms of the key a set-up data module's partitioner split on, its value names and title.

    Label-free partitioners (``needs_examples``: topic clusters, a metadata column, length bins) are
    shown over their own key; ``natural_id`` over the group ids; the others over the labels.
    """
    dm = datamodule
    part = dm.partitioner
    train = dm.splits.train
    if getattr(part, "needs_examples", False):
        from fedlight.core.datamodule import resolve_seed

        key = part.partition_key(train, dm.splits.groups, resolve_seed(dm.seed))
        return label_histograms(dm.client_indices, key.ids, key.num_values), key.names, key.title
    if getattr(part, "needs_groups", False) and dm.splits.groups is not None:
        names, ids = np.unique(np.asarray([str(g) for g in dm.splits.groups]), return_inverse=True)
        return label_histograms(dm.client_indices, ids, len(names)), [str(n) for n in names], "group"
    if dm.num_classes == 0:  # unlabelled data under a label partitioner: only the client sizes mean anything
        return label_histograms(dm.client_indices, np.zeros(len(train), dtype=np.int64), 1), ["all"], "unlabelled"
    return (
        label_histograms(dm.client_indices, dm.splits.train_labels(), dm.num_classes),
        list(dm.splits.label_names),
        "label",
    )


def show_partitions(argv: list[str]) -> int:
    """``fedlight partitions --config x.yaml [--plot out.png]``: per-client histograms of the partition key."""
    import argparse

    from fedlight.cli import run_cli

    parser = argparse.ArgumentParser(prog="fedlight partitions", description=show_partitions.__doc__)
    parser.add_argument("--config", required=True, help="a fedlight fit config")
    parser.add_argument("--plot", help="also write stacked bars to this image file")
    args = parser.parse_args(argv)
    cli = run_cli(["--config", args.config, "--trainer.logger", "false"], run=False)
    dm = cli.datamodule
    dm.setup("fit")
    histograms, names, title = partition_histograms(dm)
    print(f"partition key: {title} ({dm.partitioner.name})")
    print(format_histograms(histograms, names).replace("label skew", f"{title} skew"))
    if args.plot:
        path = plot_histograms(
            histograms, args.plot, names, title=f"{title} histogram per client ({dm.partitioner.name})"
        )
        print(f"wrote {path}")
    return 0
