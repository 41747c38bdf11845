"""Every file a run writes goes through here: atomic replacement, and one clear :class:`StorageError`.

A read-only, full or blocked log directory must end a run with one message that names the path, and
must never tear a file a resume depends on. So each writer here

* writes to ``<name>.tmp`` in the same directory, flushes, ``fsync``\\ s and ``os.replace``\\ s it over the
  target (the previous version stays intact until the new one is complete on disk), removes its
  temporary on failure, and
* turns any ``OSError`` into a :class:`~fedlight.errors.StorageError` that names the target path, the
  reason (``ENOSPC``, ``EROFS``, ``ENOTDIR`` …) and what to change.

Temporaries left by a killed process are removed on the next start (:func:`remove_stale_tmp`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from fedlight.errors import StorageError

TMP_SUFFIX = ".tmp"
PROBE_NAME = ".fedlight-write-probe"

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}
_BLOCKED = {errno.ENOTDIR, errno.EEXIST, errno.EISDIR}


def _advice(code: int | None) -> str:
    if code in _FULL:
        return "free space on that disk (or raise the quota / file-size limit)"
    if code in _READ_ONLY:
        return "make that directory writable"
    if code in _BLOCKED:
        return "a file is in the way of a directory on that path (or the reverse): move it"
    return "check that disk"


def storage_error(err: OSError, path: str | os.PathLike, action: str = "write") -> StorageError:
    """The one message for a failed write: the path, the OS reason, what to change, what is kept."""
    code = err.errno
    reason = err.strerror or str(err)
    name = errno.errorcode.get(code, "") if code is not None else ""
    culprit = f" (at {err.filename})" if err.filename and os.fspath(err.filename) != os.fspath(path) else ""
    return StorageError(
        f"cannot {action} {os.fspath(path)}: {reason}{f' [{name}]' if name else ''}{culprit}; "
        f"{_advice(code)}, or point the run elsewhere (trainer.logger.init_args.save_dir or "
        "trainer.default_root_dir). Files written before are intact; resume from the last round checkpoint.",
        path=Path(path),
        errno=code,
    )


def _as_os_error(err: BaseException | None) -> OSError | None:
    """The OS error behind ``err``: itself, one it was raised from or while handling (torch's zip
    writer turns a failed ``write`` into a ``RuntimeError``), or the one safetensors' Rust writer
    reports only as text."""
    from safetensors import SafetensorError

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError):
            return err
        if isinstance(err, SafetensorError) and (found := re.search(r"os error (\d+)", str(err))):
            code = int(found.group(1))
            return OSError(code, os.strerror(code))
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def storage_errors(path: str | os.PathLike, action: str = "write") -> Iterator[None]:
    """Turn an ``OSError`` raised inside the block into a :class:`StorageError` naming ``path``."""
    try:
        yield
    except StorageError:
        raise
    except Exception as err:
        os_error = _as_os_error(err)
        if os_error is None:
            raise
        raise storage_error(os_error, path, action) from err


def as_storage_error(err: BaseException) -> StorageError | None:
    """``err`` as a :class:`StorageError` if it is one, or an ``OSError`` of a disk that is full,
    read-only or blocked by a file (raised by a library's own writer, e.g. Lightning's logger);
    ``None`` for anything else (a missing input file stays what it is)."""
    if isinstance(err, StorageError):
        return err
    if isinstance(err, OSError) and err.errno in _FULL | _READ_ONLY | _BLOCKED and err.filename:
        return storage_error(err, err.filename, "write to")
    return None


def ensure_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    with storage_errors(path, "create the directory"):
        path.mkdir(parents=True, exist_ok=True)
    return path


def _fsync_dir(directory: Path) -> None:
    """Persist a rename (best effort: some file systems cannot fsync a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _discard(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """``write(f)`` (its return value is ignored) into ``<path>.tmp``, fsync it and ``os.replace`` it over ``path``; returns ``path``.

    On any failure the temporary is removed and ``path`` is left exactly as it was.
    """
    path = Path(path)
    ensure_dir(path.parent)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with storage_errors(path):
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            _discard(tmp)
            raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    data = text.encode(encoding)
    return atomic_write(path, lambda f: f.write(data))


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    src = Path(src)

    def copy(f: BinaryIO) -> None:
        with storage_errors(src, "read"), src.open("rb") as source:
            shutil.copyfileobj(source, f, 1 << 20)

    return atomic_write(dst, copy)


def append_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Append ``text`` durably; on failure cut the file back to its old length (no half-written line)."""
    path = Path(path)
    ensure_dir(path.parent)
    data = text.encode(encoding)
    with storage_errors(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory at ``<path>.tmp`` and swap it in for ``path`` only once the block succeeded.

    Any ``OSError`` in the block becomes a :class:`StorageError` naming ``path``; the temporary is
    removed and an existing ``path`` is kept unless the new one is complete.
    """
    path = Path(path)
    ensure_dir(path.parent)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    old = path.with_name(path.name + ".old" + TMP_SUFFIX)
    with storage_errors(path):
        try:
            _discard(tmp)
            tmp.mkdir()
            yield tmp
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
        except BaseException:
            _discard(tmp)
            if old.exists() and not path.exists():
                with contextlib.suppress(OSError):
                    os.replace(old, path)
            raise
    _discard(old)
    _fsync_dir(path.parent)


def check_writable(directory: str | os.PathLike) -> Path:
    """Fail now, before round 1, if ``directory`` cannot take a file (created if missing)."""
    directory = ensure_dir(directory)
    probe = atomic_write(directory / PROBE_NAME, lambda f: f.write(b"fedlight\n"))
    with storage_errors(directory):
        probe.unlink()
    return directory


def remove_stale_tmp(directory: str | os.PathLike, pattern: str = "*" + TMP_SUFFIX) -> list[Path]:
    """Remove temporaries (``pattern``) an interrupted write left in ``directory``; logs each removal."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for stale in sorted(directory.glob(pattern)):
        with storage_errors(stale, "remove the stale temporary file"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        rank_zero_info(f"[fedlight] removed {stale}: left by an interrupted write")
        removed.append(stale)
    return removed


def release_loggers(trainer, exception: BaseException) -> None:
    """After a storage failure, flush each logger now and drop those that cannot write either.

    Lightning finalises (writes) every logger after an exception; a logger on the same broken disk
    would raise a second ``OSError`` that hides the first, clear, message.
    """
    if as_storage_error(exception) is None:
        return
    keep = []
    for logger in trainer.loggers:
        try:
            logger.save()
        except OSError as err:
            rank_zero_warn(f"[fedlight] logger {type(logger).__name__} could not write either ({err}); dropped")
            continue
        keep.append(logger)
    trainer.loggers = keep
