"""What a config may make fedlight import, and how big a config may be.

jsonargparse turns strings into imported objects in many places: ``class_path`` values, ``Callable``
init args (``LambdaLR.lr_lambda``, ``LambdaCallback`` hooks), ``type`` values, list items, command-line
overrides and ``+=``. Every one of them goes through jsonargparse's import-path policy, so that policy
is the single seam: :func:`install` sets it to *deny everything* except :func:`allowed_import_paths`
(the modules below, ``FEDLIGHT_ALLOWED_MODULES`` and the registered plugin classes). jsonargparse checks
a path before importing it (a module named by a config is never imported, so its top level never runs)
and checks where the resolved object is *defined* (``fedlight.cli.os.system`` is ``posix.system``,
refused). fedlight's own YAML pass (:func:`check_import_path`) applies the same list to ``class_path``
values anywhere, including positions typed ``Any`` that jsonargparse leaves alone, to name the key.

:func:`safe_load` bounds a YAML document before anything walks it: bytes, nesting depth and the number
of nodes *after alias expansion* (an alias bomb of a few hundred bytes expands to billions of nodes
when walked, though ``yaml.safe_load`` itself returns shared objects quickly).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

import yaml

from fedlight.errors import ConfigError

#: modules whose classes and functions a config may name outside the plugin registry: fedlight itself,
#: the parts of Lightning a Trainer section names (loggers, callbacks, strategies, plugins, profilers,
#: accelerators; Fabric for the classes they re-export), optimizers/schedulers, torchmetrics
DEFAULT_ALLOWED_MODULES: tuple[str, ...] = (
    "fedlight",
    "lightning.pytorch.accelerators",
    "lightning.pytorch.callbacks",
    "lightning.pytorch.loggers",
    "lightning.pytorch.plugins",
    "lightning.pytorch.profilers",
    "lightning.pytorch.strategies",
    "lightning.pytorch.cli.ReduceLROnPlateau",
    "lightning.fabric.accelerators",
    "lightning.fabric.plugins",
    "lightning.fabric.strategies",
    "torch.optim",
    "torchmetrics",
)
ALLOWED_MODULES_ENV = "FEDLIGHT_ALLOWED_MODULES"

#: a config file (or one command-line value) larger than this is refused unread (shipped configs: < 2 kB)
MAX_CONFIG_BYTES = 256 * 1024
#: YAML nodes after alias expansion (the largest shipped config has about 150)
MAX_CONFIG_NODES = 20_000
#: nesting depth of mappings/sequences
MAX_CONFIG_DEPTH = 64


def _entries(text: str, source: str) -> list[str]:
    out = []
    for raw in text.split(","):
        entry = raw.strip().rstrip(".")
        if not entry:
            continue
        if not all(part.isidentifier() for part in entry.split(".")):
            raise ConfigError(f"{source}: {raw.strip()!r} is not a dotted module path (e.g. mypkg or mypkg.callbacks)")
        out.append(entry)
    return out


def allowed_modules() -> tuple[str, ...]:
    """The default modules plus ``FEDLIGHT_ALLOWED_MODULES`` (comma-separated, e.g. ``mypkg,other.sub``)."""
    return DEFAULT_ALLOWED_MODULES + tuple(_entries(os.environ.get(ALLOWED_MODULES_ENV, ""), ALLOWED_MODULES_ENV))


def allowed_import_paths() -> tuple[str, ...]:
    """Everything a config may name: :func:`allowed_modules` and each registered plugin class."""
    from fedlight.plugins import get_registry

    registry = get_registry()
    plugins = sorted({e.import_path for table in registry.entries.values() for e in table.values()})
    return allowed_modules() + tuple(plugins)


def is_allowed(path: str, allowed: Iterable[str] | None = None) -> bool:
    """Whether ``path`` is an allowed entry or lies under one (``fedlight`` allows ``fedlight.x.Y``)."""
    allowed = allowed_import_paths() if allowed is None else allowed
    return any(path == entry or path.startswith(entry + ".") for entry in allowed)


def refusal(path: str, where: str = "") -> str:
    """The message for a refused import path: what is allowed and how to extend it."""
    prefix = f"{where}: " if where else ""
    return (
        f"{prefix}import path {path!r} is not allowed: a config may name registered fedlight plugins and "
        f"classes or functions defined in {', '.join(allowed_modules())}. Register it as a plugin, or, if you "
        f"trust the module, set {ALLOWED_MODULES_ENV}={path.rsplit('.', 1)[0]}"
    )


def check_import_path(path: str, where: str = "") -> None:
    """Refuse an import path that is not allowed, before anything imports it."""
    if not is_allowed(path):
        raise ConfigError(refusal(path, where))


_installed: set[str] = set()


def install() -> None:
    """Make jsonargparse refuse every import path a value names unless it is allowed.

    Called each time the CLI builds its parser (the plugin registry or the environment may have
    changed); entries allowed by an earlier call and no longer wanted are denied again.
    """
    from jsonargparse import set_parsing_settings

    allowed = set(allowed_import_paths())
    stale = sorted(_installed - allowed)
    set_parsing_settings(
        import_path_denylist=["*", *stale],
        import_path_allowlist=sorted(allowed),
        # a class_path dict in an ``Any``/``dict[str, Any]`` position is checked like any other (so the
        # policy applies to it) but stays a dict, never an instance
        validate_subclass_spec_in_any=True,
        instantiate_subclass_spec_in_any=False,
    )
    _installed.clear()
    _installed.update(allowed)


# --------------------------------------------------------------------------------------- bounded YAML


def _budget_walk(node: yaml.Node) -> None:
    """Count nodes as if aliases were expanded (memoised per node, so a bomb costs its own size)."""
    expanded: dict[int, int] = {}
    active: set[int] = set()

    def walk(current: yaml.Node, depth: int) -> int:
        key = id(current)
        if key in expanded:
            return expanded[key]
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(
                f"config nests deeper than {MAX_CONFIG_DEPTH} levels (line {current.start_mark.line + 1})"
            )
        if key in active:
            raise ConfigError(f"config has a recursive YAML alias (line {current.start_mark.line + 1})")
        active.add(key)
        total = 1
        if isinstance(current, yaml.SequenceNode):
            children: list[yaml.Node] = list(current.value)
        elif isinstance(current, yaml.MappingNode):
            children = [part for pair in current.value for part in pair]
        else:
            children = []
        for child in children:
            total += walk(child, depth + 1)
            if total > MAX_CONFIG_NODES:
                raise ConfigError(
                    f"config expands to more than {MAX_CONFIG_NODES} YAML nodes (aliases counted as copies); "
                    "a fedlight config has a few hundred: remove repeated aliases or move bulk data into a file"
                )
        active.discard(key)
        expanded[key] = total
        return total

    walk(node, 0)


def safe_load(text: str | bytes) -> Any:
    """``yaml.safe_load`` with bounds on bytes, depth and alias-expanded size; errors are ConfigErrors."""
    size = len(text.encode() if isinstance(text, str) else text)
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config is {size} bytes; the limit is {MAX_CONFIG_BYTES} (a fedlight config is a few kB)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)  # libyaml when available: 1 MB in ~0.1 s
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _budget_walk(node)
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"config nests deeper than {MAX_CONFIG_DEPTH} levels") from None
    finally:
        loader.dispose()


# --------------------------------------------------------------------------------------- messages

#: trainer options fedlight derives from its own; giving them directly would be silently overwritten
DERIVED_TRAINER_KEYS = {"max_epochs": "federation.rounds (one Lightning epoch is one federated round)"}


def check_derived_keys(cfg: Any) -> None:
    """Refuse ``trainer.max_epochs`` in a config: it is set from ``federation.rounds``."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("trainer"), dict):
        return
    for key, source in DERIVED_TRAINER_KEYS.items():
        if key in cfg["trainer"]:
            rounds = cfg.get("federation", {}).get("rounds") if isinstance(cfg.get("federation"), dict) else None
            if rounds is not None and cfg["trainer"][key] == rounds:
                continue  # a printed/saved config repeats the linked value: harmless
            raise ConfigError(f"trainer.{key} is set by fedlight from {source}; set federation.rounds instead")


_INTERNAL_MODULES = ("jsonargparse", "argparse", "lightning", "importlib", "typing", "inspect", "docstring_parser")


def innermost_user_error(err: BaseException) -> BaseException | None:
    """The deepest ValueError/OSError in ``err``'s chain raised by a plugin, not by the parser machinery.

    jsonargparse wraps a constructor's ``ValueError`` in a "Does not validate against any of the Union
    subtypes" dump (keeping it as ``__cause__``); the plugin's own message is the one to show.
    """
    found, seen = None, set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        tb = current.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        module = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
        if isinstance(current, (ValueError, OSError)) and not module.startswith(_INTERNAL_MODULES):
            found = current
        current = current.__cause__ or current.__context__
    return found


def _close(key: str, known: Iterable[str]) -> list[str]:
    import difflib

    known = sorted(k for k in set(known) if not k.endswith(".help") and not key.startswith(k + "."))
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    if not close:  # compare the last part too: model.pef -> model.peft
        leaf = key.rsplit(".", 1)[-1]
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        siblings = [k for k in known if (k.rsplit(".", 1)[0] if "." in k else "") == parent]
        close = [
            k
            for k in siblings
            if k.rsplit(".", 1)[-1]
            in difflib.get_close_matches(leaf, [s.rsplit(".", 1)[-1] for s in siblings], n=3, cutoff=0.6)
        ]
    return close


def explain(message: str, known_keys: Iterable[str] = (), err: BaseException | None = None) -> str:
    """Rewrite a jsonargparse error so it says what to change."""
    import re

    denied = re.search(r"Importing '([\w.]+)' is not allowed", message)
    if denied:
        where = re.search(r'Parser key "([\w.]+)"', message)
        return refusal(denied.group(1), where.group(1) if where else "")
    for key, source in DERIVED_TRAINER_KEYS.items():
        if f"trainer.{key}" in message:
            return f"trainer.{key} is set by fedlight from {source}; set federation.rounds instead"
    bad_arg = re.search(
        r'Parser key "([\w.]+)":\s*Problem with given class_path \'([\w.]+)\':\s*Option \'([\w.]+)\' is not accepted',
        message,
    )
    if bad_arg:
        key, class_path, option = bad_arg.groups()
        accepted = init_arg_names(class_path)
        close = _close(option, accepted)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        return (
            f"{key}.init_args.{option}: {class_path.rsplit('.', 1)[-1]} has no argument {option!r}; {hint}"
            f"accepted: {', '.join(accepted) or 'none'}"
        )
    unknown = re.search(
        r"does not accept options? '([\w.]+)'|unrecognized arguments: --([\w.]+)", message, re.IGNORECASE
    )
    if unknown:
        key = unknown.group(1) or unknown.group(2)
        close = _close(key, known_keys)
        hint = f"; did you mean {' or '.join(close)}?" if close else "; run with --help for the accepted keys"
        return f"unknown config key {key!r}{hint}"
    inner = innermost_user_error(err) if err is not None else None
    if inner is not None and str(inner) and str(inner) not in ("", message):
        return str(inner)
    return message


def init_arg_names(class_path: str) -> list[str]:
    """The constructor arguments of an (already allowed and imported) class, base classes included."""
    import importlib
    import inspect

    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for klass in getattr(cls, "__mro__", ()):
        if "__init__" not in vars(klass) or klass is object:
            continue
        try:
            params = inspect.signature(klass.__init__).parameters.values()
        except (TypeError, ValueError):
            continue
        for p in params:
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in names:
                names.append(p.name)
    return names


def parser_keys(parser: Any) -> set[str]:
    """Every option key a parser (and its subcommand parsers) accepts, for close-match suggestions."""
    keys: set[str] = set()
    stack = [parser]
    while stack:
        current = stack.pop()
        for action in getattr(current, "_actions", []):
            if action.dest and action.dest not in ("help", "config"):
                keys.add(action.dest)
            choices = getattr(action, "choices", None)
            if isinstance(choices, dict):
                stack.extend(p for p in choices.values() if hasattr(p, "_actions"))
    return keys


def drop_cwd_from_path() -> None:
    """``python -m fedlight`` puts the current directory first on ``sys.path``; take it off.

    A file in the directory a run starts from must not be importable just because a config (or a
    plugin name) names it. ``PYTHONPATH=.`` still adds it deliberately.
    """
    if sys.path and sys.path[0] in ("", os.getcwd()):
        sys.path.pop(0)
