"""fedlight: federated fine-tuning of foundation models with parameter-efficient methods.

The plugin-author API: every base class and type a plugin needs is importable from here
(``from fedlight import Aggregator, State, hookimpl``), and ``fedlight.testing`` holds the contract
checks. Names resolve lazily, so ``import fedlight`` does not import Lightning or the models.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS = {
    # plugin kinds
    "Plugin": "fedlight.core.plugin_base",
    "Task": "fedlight.tasks.base",
    "Dataset": "fedlight.data.base",
    "Partitioner": "fedlight.partitioners.base",
    "PeftMethod": "fedlight.peft.base",
    "Codec": "fedlight.codecs.base",
    "Aggregator": "fedlight.aggregators.base",
    "Privacy": "fedlight.privacy.base",
    "Attack": "fedlight.attacks.base",
    "ClientMethod": "fedlight.client_methods.base",
    "Evaluator": "fedlight.evaluators.base",
    "RoundFeature": "fedlight.features.base",
    "hookimpl": "fedlight.hookspecs",
    # the types they exchange
    "State": "fedlight.core.state",
    "add": "fedlight.core.state",
    "subtract": "fedlight.core.state",
    "weighted_sum": "fedlight.core.state",
    "global_norm": "fedlight.core.state",
    "ClientUpdate": "fedlight.core.update",
    "DecodedUpdate": "fedlight.core.update",
    "AggregationReport": "fedlight.core.server",
    "RoundEngine": "fedlight.core.engine",
    "RoundState": "fedlight.core.engine",
    "ClientRun": "fedlight.core.engine",
    "PayloadError": "fedlight.codecs.wire",
    "ConfigError": "fedlight.errors",
    # running
    "FederatedModule": "fedlight.core.module",
    "FederatedDataModule": "fedlight.core.datamodule",
    "FederatedRound": "fedlight.core.round",
    "get_registry": "fedlight.plugins",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedlight' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
