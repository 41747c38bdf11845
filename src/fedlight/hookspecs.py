"""The whole fedlight extension contract: one pluggy hook per plugin kind.

A plugin package implements any of these hooks in one module and names that module under the
``fedlight`` entry-point group::

    [project.entry-points.fedlight]
    my_plugin = "my_package.plugin"

Every hook takes no arguments, is called once when the plugin manager is built (before the CLI
parser exists), and returns a list of plugin *classes* (not instances), or of ``"module:Class"``
paths: a path is listed from the module's source without importing it and imported on first use
(``fedlight plugins`` stays fast; see docs/plugins.md). Each class subclasses the kind's base class,
has a unique short ``name``, a one-line docstring summary and typed ``__init__`` arguments, which
become its YAML ``init_args``. fedlight's own built-ins register through these very hooks, so a
third-party plugin has exactly the same powers as a built-in one.
"""

from __future__ import annotations

import pluggy

PROJECT = "fedlight"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---------------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------------


@hookspec
def fedlight_tasks() -> list[type]:
    """Return :class:`fedlight.tasks.base.Task` subclasses (model, loss, metrics, collation)."""


@hookspec
def fedlight_datasets() -> list[type]:
    """Return :class:`fedlight.data.base.Dataset` subclasses (offline labelled examples)."""


@hookspec
def fedlight_partitioners() -> list[type]:
    """Return :class:`fedlight.partitioners.base.Partitioner` subclasses (examples -> clients)."""


# ---------------------------------------------------------------------------------------------
# What trains and what travels
# ---------------------------------------------------------------------------------------------


@hookspec
def fedlight_peft_methods() -> list[type]:
    """Return :class:`fedlight.peft.base.PeftMethod` subclasses (which tensors train and travel)."""


@hookspec
def fedlight_codecs() -> list[type]:
    """Return :class:`fedlight.codecs.base.Codec` subclasses (named tensors <-> bytes)."""


# ---------------------------------------------------------------------------------------------
# The server side
# ---------------------------------------------------------------------------------------------


@hookspec
def fedlight_aggregators() -> list[type]:
    """Return :class:`fedlight.aggregators.base.Aggregator` subclasses (updates -> new global)."""


@hookspec
def fedlight_privacy() -> list[type]:
    """Return :class:`fedlight.privacy.base.Privacy` subclasses (client/server update transforms)."""


# ---------------------------------------------------------------------------------------------
# The client side
# ---------------------------------------------------------------------------------------------


@hookspec
def fedlight_client_methods() -> list[type]:
    """Return :class:`fedlight.client_methods.base.ClientMethod` subclasses (local objective terms and
    gradient corrections, e.g. FedProx, SCAFFOLD, with what extra they send)."""


# ---------------------------------------------------------------------------------------------
# Evaluation of the global model
# ---------------------------------------------------------------------------------------------


@hookspec
def fedlight_evaluators() -> list[type]:
    """Return :class:`fedlight.evaluators.base.Evaluator` subclasses (benchmark suites on local files, run on
    the global model every ``model.eval_every`` rounds and at the end, and by ``fedlight evaluate``)."""


# ---------------------------------------------------------------------------------------------
# The round
# ---------------------------------------------------------------------------------------------


@hookspec
def fedlight_round_features() -> list[type]:
    """Return :class:`fedlight.features.base.RoundFeature` subclasses (behaviour run by the round engine at
    fixed points of every round, listed by users in ``federation.features``)."""


@hookspec
def fedlight_engines() -> dict[str, object]:
    """Return ``{name: main}``: engine subcommands, ``fedlight <name> ...`` calls ``main(argv) -> int``
    (e.g. fedlight-flower's ``flower``). Called lazily, only when that subcommand runs."""


# ---------------------------------------------------------------------------------------------
# Evaluation of defences
# ---------------------------------------------------------------------------------------------


@hookspec
def fedlight_attacks() -> list[type]:
    """Return :class:`fedlight.attacks.base.Attack` subclasses (malicious-client behaviours)."""
