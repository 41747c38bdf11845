"""Errors users act on: each message says what to change; the CLI prints them without a traceback."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config (or a file it names) cannot be used; raised before round 1."""
