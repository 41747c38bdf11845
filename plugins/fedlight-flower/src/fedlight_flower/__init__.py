"""fedlight on Flower: the same YAML, the same client/server pipelines, Flower as the transport.

Importing this package sets Flower's and Ray's "quiet and offline" switches (``QUIET_ENV``) unless the
user set them already; they must be set before ``flwr`` is imported, because Flower reads some of them
at import time.
"""

from __future__ import annotations

import os

#: environment defaults; an explicit value in the environment always wins
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",  # flwr.supercore.telemetry: no usage events to telemetry.flower.ai
    "FLWR_DISABLE_UPDATE_CHECK": "1",  # flwr.supercore.update_check: no PyPI version probe
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # SuperLink: no `uv sync` of the app's deps
    "RAY_USAGE_STATS_ENABLED": "0",  # Ray (simulation backend): no usage stats
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
    "RAY_DEDUP_LOGS": "1",
    "JSONARGPARSE_DEPRECATION_WARNINGS": "off",  # worker processes rebuild the CLI: no repeated notices
}


def apply_quiet_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Set the quiet/offline defaults in ``env`` (``os.environ`` by default); returns it."""
    target = os.environ if env is None else env
    for key, value in QUIET_ENV.items():
        target.setdefault(key, value)
    from fedlight.cli import OFFLINE_ENV

    for key, value in OFFLINE_ENV.items():
        target.setdefault(key, value)
    return target


apply_quiet_env()

__all__ = ["QUIET_ENV", "apply_quiet_env"]
