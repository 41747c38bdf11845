"""Entry-point module of fedlight-example (group ``fedlight``): registers its classes by import path.

It imports nothing but ``hookimpl``, so ``fedlight plugins`` lists the aggregator (name and summary read
from ``plugin.py``'s source) without importing torch; fedlight imports the class when a config uses it.
"""

from __future__ import annotations

from fedlight import hookimpl


@hookimpl
def fedlight_aggregators() -> list[type | str]:
    return ["fedlight_example.plugin:ServerLRFedAvg"]
