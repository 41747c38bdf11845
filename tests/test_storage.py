"""Disks fail loudly, nothing is lost: every writer, every OS failure point, and real runs through the CLI.

Tests run as root, where ``chmod`` does not stop a write, so failures come from (a) real OS limits
(a path blocked by a file: ENOTDIR/EEXIST; ``RLIMIT_FSIZE``: EFBIG from the kernel) and (b) errors
injected at the system-call edge only (``os.open`` / ``os.write`` / ``os.fsync`` / ``os.replace``
raising ENOSPC, EROFS, … for one file name), never inside fedlight.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import itertools
import os
import random
from pathlib import Path

import pytest
import torch
import yaml
from conftest import text_config

from fedlight.core.checkpoint import AtomicCheckpointIO
from fedlight.core.manifest import write_manifest
from fedlight.core.storage import append_text, atomic_copy, atomic_dir, atomic_write_text, remove_stale_tmp
from fedlight.errors import StorageError

ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EIO, errno.EACCES)


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def inject(monkeypatch, op: str, pattern: str, code: int, after: int = 0) -> list[str]:
    """Make ``os.<op>`` fail with ``code`` for paths matching ``pattern`` (fnmatch on the full path;
    for ``replace`` the source), once ``after`` matching calls have gone through."""
    hits: list[str] = []
    seen = [0]
    real = getattr(os, op)

    def fake(*args, **kwargs):
        path = _fd_path(args[0]) if op in ("fsync", "write") else os.fspath(args[0])
        if fnmatch.fnmatch(path, pattern):
            seen[0] += 1
            if seen[0] > after:
                hits.append(path)
                raise OSError(code, os.strerror(code), path)
        return real(*args, **kwargs)

    monkeypatch.setattr(os, op, fake)
    return hits


def _digest(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file())).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


# each writer: (make the old file, write the new one); which system calls it makes on the target
def _w_text(p: Path) -> None:
    atomic_write_text(p, "new text\n" * 100)


def _w_copy(p: Path) -> None:
    src = p.with_name("source.bin")
    src.write_bytes(os.urandom(5000))
    atomic_copy(src, p)


def _w_append(p: Path) -> None:
    append_text(p, '{"round": 2}\n' * 50)


def _w_checkpoint(p: Path) -> None:
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.randn(300)}, "epoch": 2}, p)


def _w_manifest(p: Path) -> None:
    write_manifest({"method": "lora", "shared": {"tensors": list(range(50))}}, p)


def _w_dir(p: Path) -> None:
    with atomic_dir(p) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(os.urandom(3000))
        (tmp / "fedlight_adapter.json").write_text("{}")


WRITERS = {
    "text": (_w_text, ("open", "fsync", "replace")),
    "copy": (_w_copy, ("open", "fsync", "replace")),
    "append": (_w_append, ("open", "write", "fsync")),
    "checkpoint": (_w_checkpoint, ("open", "fsync", "replace")),
    "manifest": (_w_manifest, ("open", "fsync", "replace")),
    "dir": (_w_dir, ("replace",)),
}
CASES = [(w, op, code) for w, (_, ops) in WRITERS.items() for op, code in itertools.product(ops, ERRNOS)]


def _old(kind: str, target: Path) -> None:
    if kind == "dir":
        target.mkdir()
        (target / "adapter_model.safetensors").write_bytes(b"old adapter")
    elif kind == "checkpoint":
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 1}, target)
    else:
        target.write_text('{"round": 1}\n')


@pytest.mark.parametrize(("kind", "op", "code"), CASES, ids=[f"{w}-{op}-{errno.errorcode[c]}" for w, op, c in CASES])
def test_every_writer_keeps_the_old_file_on_every_os_failure(kind, op, code, tmp_path, monkeypatch):
    target = tmp_path / ("round-0001" if kind == "dir" else f"target.{kind}")
    _old(kind, target)
    before = _digest(target)
    # the failing call hits the temporary (or, for append, the file itself) and nothing else
    hits = inject(monkeypatch, op, f"{target}*", code)
    with pytest.raises(StorageError) as caught:
        WRITERS[kind][0](target)
    monkeypatch.undo()
    assert hits, "the fault was never reached"
    message = str(caught.value)
    assert str(target) in message and errno.errorcode[code] in message and "\n" not in message
    assert caught.value.errno == code and caught.value.path == target
    assert _digest(target) == before  # the previous version is intact, byte for byte
    assert not list(tmp_path.glob("*.tmp")), "a temporary was left behind"
    if kind == "checkpoint":
        assert AtomicCheckpointIO().load_checkpoint(target)["epoch"] == 1


def test_a_real_kernel_write_limit_is_one_storage_error_and_nothing_is_torn(tmp_path):
    """RLIMIT_FSIZE makes the kernel itself refuse writes past N bytes (EFBIG; Python ignores SIGXFSZ)."""
    import resource
    import signal

    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
    AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(10)}, tmp_path / "last.ckpt")
    (tmp_path / "rounds.csv").write_text("round\n0\n")
    (tmp_path / "samples.jsonl").write_text("{}\n")
    writes = {
        "last.ckpt": lambda: AtomicCheckpointIO().save_checkpoint({"w": torch.randn(50000)}, tmp_path / "last.ckpt"),
        "rounds.csv": lambda: atomic_write_text(tmp_path / "rounds.csv", "x" * 30000),
        "samples.jsonl": lambda: append_text(tmp_path / "samples.jsonl", "y" * 30000),
    }
    errors = {}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20000, hard))
    try:
        for name, write in writes.items():
            try:
                write()
            except StorageError as err:
                errors[name] = err
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert set(errors) == set(writes)
    for name, err in errors.items():
        assert err.errno == errno.EFBIG and str(tmp_path / name) in str(err) and "EFBIG" in str(err)
    assert torch.equal(AtomicCheckpointIO().load_checkpoint(tmp_path / "last.ckpt")["w"], torch.zeros(10))
    assert (tmp_path / "rounds.csv").read_text() == "round\n0\n"
    assert (tmp_path / "samples.jsonl").read_text() == "{}\n"  # cut back: no half-written line
    assert not list(tmp_path.glob("*.tmp"))


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    rng = random.Random(0)
    stale, kept = [], []
    for i in range(60):
        base = rng.choice([f"round-{i:04d}.ckpt", f"rounds{i}.csv", f"manifest{i}.json", f"round-{i:04d}", f"n{i}"])
        name = base + rng.choice([".tmp", "", ".tmpl", ".tmp.bak", ".old.tmp"])
        path = tmp_path / name
        if path.exists():
            continue
        if rng.random() < 0.3:
            path.mkdir()
            (path / "inner.tmp").write_text("x")
        else:
            path.write_text("x")
        (stale if name.endswith(".tmp") else kept).append(path)
    removed = remove_stale_tmp(tmp_path)
    assert sorted(removed) == sorted(stale) and stale
    assert all(not p.exists() for p in stale) and all(p.exists() for p in kept)
    assert remove_stale_tmp(tmp_path / "missing") == []


# --- real runs through fedlight.cli.main ---------------------------------------------------------

FED = {"rounds": 3, "clients_per_round": 2, "local_steps": 2, "checkpoint_every": 1}


def _main(cfg: dict, tmp_path: Path, *extra: str) -> int:
    from fedlight.cli import main

    path = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return main(["fit", "--config", str(path), *extra])


def _one_error_line(err: str, *needles: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("fedlight: error:")]
    assert len(lines) == 1, err[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("blocker", ["file_above", "file_at_run_dir"])
def test_a_blocked_log_directory_fails_before_round_1(blocker, tiny_bert_dir, tmp_path, capsys):
    cfg = text_config(tiny_bert_dir, tmp_path, federation=FED)
    runs = tmp_path / "runs"
    if blocker == "file_above":  # save_dir is a regular file: ENOTDIR below it
        runs.write_text("not a directory")
        culprit = runs / "t"
    else:  # the run's own directory is a file: EEXIST
        (runs / "t").mkdir(parents=True)
        (runs / "t" / "version_0").write_text("a file where the run directory goes")
        culprit = runs / "t" / "version_0"
    assert _main(cfg, tmp_path) == 1
    _one_error_line(capsys.readouterr().err, str(culprit), "cannot ")
    assert not list(tmp_path.rglob("rounds.csv")) and not list(tmp_path.rglob("*.ckpt"))


def _ckpt_dir(tmp_path: Path) -> Path:
    (d,) = {p.parent for p in (tmp_path / "runs").rglob("round-0001.ckpt")}
    return d


def _global(path: Path) -> dict[str, torch.Tensor]:
    ckpt = AtomicCheckpointIO().load_checkpoint(path)
    (state,) = [v for k, v in ckpt["callbacks"].items() if "FederatedRound" in k]
    return state["global_state"]


# where the disk fills in round 2: the checkpoint, its last.ckpt copy, rounds.csv, the adapter export;
# and how many writes of that file came before (last.ckpt once in round 1; rounds.csv in rounds 0 and 1)
FULL_AT = {"round-0002.ckpt": 0, "last.ckpt": 1, "rounds.csv": 2, "adapters/round-0002": 0}


@pytest.fixture(scope="module")
def uninterrupted(tiny_bert_dir, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final global state of the same run on a healthy disk."""
    clean = tmp_path_factory.mktemp("clean")
    assert _main(text_config(tiny_bert_dir, clean, federation={**FED, "export_every": 1}), clean) == 0
    (reference,) = sorted((clean / "runs").rglob("round-0003.ckpt"))
    return _global(reference)


@pytest.mark.parametrize("target", list(FULL_AT))
def test_disk_full_in_round_2_ends_with_one_message_and_resumes(
    target, uninterrupted, tiny_bert_dir, tmp_path, monkeypatch, capsys, caplog
):
    cfg = text_config(tiny_bert_dir, tmp_path, federation={**FED, "export_every": 1})
    op = "replace" if target.startswith("adapters") else "fsync"
    hits = inject(monkeypatch, op, f"*/{target}.tmp", errno.ENOSPC, after=FULL_AT[target])
    assert _main(cfg, tmp_path) == 1
    monkeypatch.undo()
    assert hits
    line = _one_error_line(capsys.readouterr().err, target.split("/")[-1], "No space left on device", "ENOSPC")
    assert "resume from the last round checkpoint" in line
    ckpts = _ckpt_dir(tmp_path)
    run_dir = ckpts.parent
    assert not list(run_dir.rglob("*.tmp")), "a temporary was left behind"
    # the round-1 state is intact and is what last.ckpt holds (round 2's copy never replaced it)
    last = ckpts / "last.ckpt"
    # rounds.csv is written before the round checkpoint, the export after it
    expected_last = "round-0002.ckpt" if target == "adapters/round-0002" else "round-0001.ckpt"
    assert last.read_bytes() == (ckpts / expected_last).read_bytes()
    assert (run_dir / "adapters" / "round-0001" / "adapter_config.json").is_file()
    rows = (run_dir / "rounds.csv").read_text().splitlines()
    assert rows[0].startswith("round,") and [r.split(",")[0] for r in rows[1:]] == (
        ["0", "1"] if target == "rounds.csv" else ["0", "1", "2"]
    )
    # an interrupted write of an earlier kill: removed (and said so) when the run resumes
    (ckpts / "round-0003.ckpt.tmp").write_bytes(b"torn")
    with caplog.at_level("INFO"):
        assert _main(cfg, tmp_path, "--ckpt_path", str(last)) == 0
    assert not (ckpts / "round-0003.ckpt.tmp").exists()
    assert "round-0003.ckpt.tmp: left by an interrupted write" in caplog.text + capsys.readouterr().err
    resumed = sorted((tmp_path / "runs").rglob("round-0003.ckpt"))
    assert len(resumed) == 1
    # nothing was lost: an uninterrupted run ends in the same global state, bit for bit
    expected, got = uninterrupted, _global(resumed[0])
    assert list(expected) == list(got) and all(torch.equal(expected[k], got[k]) for k in expected)
