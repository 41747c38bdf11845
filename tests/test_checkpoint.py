"""Round checkpoints: kill a real run, resume it bit-identically; refuse corrupt, foreign or unsafe files."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import text_config
from fedlight.core.checkpoint import AtomicCheckpointIO, CheckpointError

ROUNDS = 4


def _cfg(tiny_bert_dir, tmp_path, **overrides):
    cfg = text_config(tiny_bert_dir, tmp_path, federation={"rounds": ROUNDS, "clients_per_round": 2, "local_steps": 2})
    cfg["trainer"]["logger"]["init_args"]["version"] = None
    for key, value in overrides.items():
        cfg[key] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fedlight(*args, **popen):
    cmd = [sys.executable, "-m", "fedlight", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _checkpoints(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "runs").rglob("round-*.ckpt"))


def _final_global(tmp_path: Path) -> dict[str, torch.Tensor]:
    (last,) = [p for p in _checkpoints(tmp_path) if p.name == f"round-{ROUNDS:04d}.ckpt"]
    ckpt = AtomicCheckpointIO().load_checkpoint(last)
    (state,) = [v for k, v in ckpt["callbacks"].items() if "FederatedRound" in k]
    return state["global_state"]


@pytest.mark.slow
def test_resume_after_kill_is_bit_identical(tiny_bert_dir, tmp_path):
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    full_dir.mkdir(), killed_dir.mkdir()
    full = _fedlight("fit", "--config", str(_cfg(tiny_bert_dir, full_dir)))
    out, _ = full.communicate(timeout=300)
    assert full.returncode == 0, out[-3000:]

    run = _fedlight("fit", "--config", str(_cfg(tiny_bert_dir, killed_dir)))
    deadline = time.time() + 300
    while not any(p.name == "round-0002.ckpt" for p in _checkpoints(killed_dir)):
        assert run.poll() is None and time.time() < deadline, "run ended before round 2 was checkpointed"
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not any(p.name == f"round-{ROUNDS:04d}.ckpt" for p in _checkpoints(killed_dir)), "kill came too late"
    (ckpt,) = [p for p in _checkpoints(killed_dir) if p.name == "round-0002.ckpt"]
    resumed = _fedlight("fit", "--config", str(killed_dir / "cfg.yaml"), "--ckpt_path", str(ckpt))
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out[-3000:]

    expected, got = _final_global(full_dir), _final_global(killed_dir)
    assert list(expected) == list(got)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def _digest(paths):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def test_corrupt_foreign_and_unsafe_checkpoints_are_refused(tiny_bert_dir, tmp_path, capsys):
    from conftest import run_fit

    cfg = text_config(tiny_bert_dir, tmp_path, federation={"rounds": 1})
    run_fit(cfg, tmp_path)
    good = _checkpoints(tmp_path)
    assert good
    before = _digest(good)

    torn = tmp_path / "torn.ckpt"
    torn.write_bytes(good[0].read_bytes()[:1000])

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Evil()}, evil)
    for bad in (torn, evil):
        with pytest.raises(CheckpointError, match="could not be loaded safely"):
            AtomicCheckpointIO().load_checkpoint(bad)
    assert not (tmp_path / "pwned").exists()

    from fedlight.cli import main

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(cfg_path), "--ckpt_path", str(torn)]) == 2
    assert "could not be loaded safely" in capsys.readouterr().err
    foreign = text_config(tiny_bert_dir, tmp_path, model={"peft": {"class_path": "bitfit"}}, federation={"rounds": 2})
    cfg_path.write_text(yaml.safe_dump(foreign))
    assert main(["fit", "--config", str(cfg_path), "--ckpt_path", str(good[0])]) == 2
    assert "does not match this config" in capsys.readouterr().err
    assert _digest(good) == before and _checkpoints(tmp_path) == good  # nothing overwritten or added


def test_validate_and_test_subcommands_evaluate_a_round_checkpoint(tiny_bert_dir, tmp_path):
    from conftest import run_fit

    cfg = text_config(tiny_bert_dir, tmp_path, federation={"rounds": 2})
    fit = run_fit(cfg, tmp_path)
    (last,) = [p for p in (tmp_path / "runs").rglob("last.ckpt")]
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from fedlight.cli import run_cli

    for subcommand, key in (("validate", "val_acc"), ("test", "test_acc")):
        cli = run_cli([subcommand, "--config", str(path), "--ckpt_path", str(last)])
        assert key in cli.trainer.callback_metrics
    # evaluating the checkpoint gives the accuracy the fit logged for its last round
    assert float(cli.trainer.callback_metrics["test_acc"]) == pytest.approx(fit.trainer.callback_metrics["val_acc"].item())
