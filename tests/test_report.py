"""Plots and summary tables from rounds.csv files (synthetic logs: no training needed)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fedlight.report.plots import render_report
from fedlight.report.summary import find_run_dirs, main, run_labels, summary_table

COLUMNS = ["round", "num_clients", "rejected", "uplink_bytes", "downlink_bytes", "cumulative_mb", "train_loss",
           "val_loss", "val_acc", "epsilon", "round_time_s"]  # fmt: skip


def write_run(
    path: Path, rounds: int = 4, payload: int = 1000, clients: int = 2, eps: bool = False, spread: bool = False,
    manifest: dict | None = None,
) -> Path:  # fmt: skip
    path.mkdir(parents=True)
    columns = COLUMNS + (["client_acc_mean", "client_acc_std"] if spread else [])
    cumulative = 0
    with (path / "rounds.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, columns)
        w.writeheader()
        w.writerow({"round": 0, "num_clients": 0, "uplink_bytes": 0, "downlink_bytes": 0, "cumulative_mb": 0.0,
                    "val_loss": 2.0, "val_acc": 0.1})  # fmt: skip
        for r in range(1, rounds + 1):
            cumulative += 2 * clients * payload
            row = {
                "round": r, "num_clients": clients, "rejected": 0, "uplink_bytes": clients * payload,
                "downlink_bytes": clients * payload, "cumulative_mb": cumulative / 1e6, "train_loss": 2.0 / r,
                "val_loss": 2.0 / r, "val_acc": [0.3, 0.6, 0.5, 0.55][(r - 1) % 4], "epsilon": 0.5 * r if eps else "",
                "round_time_s": 1.5,
            }  # fmt: skip
            if spread:
                row.update(client_acc_mean=row["val_acc"], client_acc_std=0.1)
            w.writerow(row)
    if manifest is not None:
        (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_summary_table_values(tmp_path):
    a = write_run(tmp_path / "lora", manifest={"shared_bytes_per_round": 1000, "full_model_bytes_per_round": 250_000})
    b = write_run(tmp_path / "dp", eps=True, payload=4000)
    table = summary_table([a, b])
    lines = table.splitlines()
    assert lines[0] == "| run | rounds | final val_acc | best val_acc | total MB | vs full FT | final ε | wall time |"
    assert lines[1].startswith("|---|---:")
    lora, dp = lines[2].split(" | "), lines[3].split(" | ")
    assert lora[0] == "| lora" and lora[1] == "4" and lora[2] == "0.5500" and lora[3] == "0.6000 (r2)"
    assert lora[4] == "16.0 kB"  # 4 rounds x 2 clients x 2 directions x 1000 bytes
    assert lora[5] == "250.0× less" and lora[6] == "–" and lora[7] == "6s |"
    assert dp[5] == "–" and dp[6] == "2.00"  # no manifest, no full size given: unknown
    # with the full-model size given, the per-client payload is estimated from the log
    assert "100.0× less" in summary_table([b], full_model_bytes=400_000)
    # a loss metric: best is the minimum
    assert "0.5000 (r4)" in summary_table([a], metric="val_loss")
    with pytest.raises(ValueError, match="val_nope"):
        summary_table([a], metric="val_nope")


def test_labels_and_run_discovery(tmp_path):
    a = write_run(tmp_path / "exp" / "version_0")
    b = write_run(tmp_path / "exp" / "version_1")
    c = write_run(tmp_path / "other" / "lora")
    assert run_labels([a, b, c]) == ["exp/version_0", "exp/version_1", "lora"]
    assert find_run_dirs([tmp_path / "exp", c]) == [a, b, c]
    with pytest.raises(FileNotFoundError):
        find_run_dirs([tmp_path / "missing"])


def test_render_report_writes_every_plot_it_has_data_for(tmp_path):
    plain = write_run(tmp_path / "plain")
    written = render_report([plain], tmp_path / "out1", formats=("png",))
    assert {p.name for p in written} == {"val_acc_vs_round.png", "val_acc_vs_mb.png", "loss_vs_round.png", "overview.png"}
    assert all(p.stat().st_size > 5000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)

    rich = write_run(tmp_path / "rich", eps=True, spread=True, payload=100_000)
    written = render_report([plain, rich], tmp_path / "out2")  # png + svg by default
    names = {p.name for p in written}
    assert {"epsilon_vs_round.svg", "client_acc_spread.png", "overview.svg"} <= names
    svg = (tmp_path / "out2" / "val_acc_vs_round.svg").read_text()
    assert "plain" in svg and "rich" in svg  # both runs in the legend (svg keeps text as text)


def test_cli_main_prints_table_and_files(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    assert main([str(run), "--out", str(tmp_path / "plots"), "--metric", "val_loss", "--format", "png"]) == 0
    out = capsys.readouterr().out
    assert "| run |" in out and "best val_loss" in out
    assert f"wrote {tmp_path / 'plots' / 'val_loss_vs_round.png'}" in out
    assert not (tmp_path / "plots" / "loss_vs_round.png").exists()  # val_loss is already the main plot
    assert main([str(tmp_path / "nothing")]) == 2
