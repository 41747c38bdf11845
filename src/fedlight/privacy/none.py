"""No privacy mechanism."""

from __future__ import annotations

from fedlight.hookspecs import hookimpl
from fedlight.privacy.base import Privacy


class NoPrivacy(Privacy):
    """No differential privacy: updates pass unchanged and no epsilon is reported."""

    name = "none"
    protects_updates = False


@hookimpl
def fedlight_privacy() -> list[type]:
    return [NoPrivacy]
