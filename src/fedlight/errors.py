"""Errors users act on: each message says what to change; the CLI prints them without a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class ConfigError(ValueError):
    """A config (or a file it names) cannot be used; raised before round 1."""


@contextmanager
def as_config_error() -> Iterator[None]:
    """A plugin's ``ValueError`` (already naming the option) becomes the ConfigError the CLI prints plainly."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from err


class CheckpointError(ConfigError):
    """A checkpoint is corrupt, unsafe or does not match the run's config."""


class StorageError(RuntimeError):
    """A run's file or directory cannot be written (read-only, full, blocked by a file).

    Raised by ``fedlight.core.storage`` with the path and the OS reason; the file that was being
    replaced is left intact. The CLI prints it as one line and exits with status 1.
    """

    def __init__(self, message: str, path=None, errno: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno
