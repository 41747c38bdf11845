"""Plugin manager and registry: built-ins and entry points, loaded the same way.

Built-in modules are registered explicitly (never as an import side effect); third-party modules
come from the ``fedlight`` entry-point group, loaded one by one so a broken package is reported by
name instead of stopping every run. ``FEDLIGHT_DISABLE_PLUGIN_AUTOLOAD=1`` skips entry points
(tests use it to be independent of what happens to be installed).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import pkgutil
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from fedlight import hookspecs
from fedlight.core.plugin_base import Plugin
from fedlight.errors import ConfigError

ENTRY_POINT_GROUP = "fedlight"
DISABLE_AUTOLOAD_ENV = "FEDLIGHT_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN_PROVIDER = "fedlight"


def autoload_enabled() -> bool:
    """Whether entry-point plugins load (``FEDLIGHT_DISABLE_PLUGIN_AUTOLOAD=1|true|yes`` turns it off)."""
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "") not in ("1", "true", "yes")


#: kind -> (hook name, base class as "module:Class"). Adding a kind is one line here plus one hookspec.
#: The base classes import torch, so they are imported on first use (``KINDS``), not with this module:
#: ``fedlight plugins`` and ``fedlight --help`` need neither.
KIND_HOOKS: dict[str, tuple[str, str]] = {
    "tasks": ("fedlight_tasks", "fedlight.tasks.base:Task"),
    "datasets": ("fedlight_datasets", "fedlight.data.base:Dataset"),
    "partitioners": ("fedlight_partitioners", "fedlight.partitioners.base:Partitioner"),
    "peft_methods": ("fedlight_peft_methods", "fedlight.peft.base:PeftMethod"),
    "codecs": ("fedlight_codecs", "fedlight.codecs.base:Codec"),
    "aggregators": ("fedlight_aggregators", "fedlight.aggregators.base:Aggregator"),
    "privacy": ("fedlight_privacy", "fedlight.privacy.base:Privacy"),
    "attacks": ("fedlight_attacks", "fedlight.attacks.base:Attack"),
    "client_methods": ("fedlight_client_methods", "fedlight.client_methods.base:ClientMethod"),
    "evaluators": ("fedlight_evaluators", "fedlight.evaluators.base:Evaluator"),
    "round_features": ("fedlight_round_features", "fedlight.features.base:RoundFeature"),
}
_kinds: dict[str, tuple[str, type]] | None = None


def kinds() -> dict[str, tuple[str, type]]:
    """kind -> (hook name, base class), the base classes imported on first call."""
    global _kinds
    if _kinds is None:
        _kinds = {}
        for kind, (hook, path) in KIND_HOOKS.items():
            module, _, qualname = path.partition(":")
            _kinds[kind] = (hook, getattr(importlib.import_module(module), qualname))
    return _kinds


def __getattr__(name: str) -> Any:
    if name == "KINDS":  # ``from fedlight.plugins import KINDS`` keeps working, lazily
        return kinds()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: packages whose modules may hold built-in hook implementations
BUILTIN_PACKAGES = [
    "fedlight.tasks",
    "fedlight.data",
    "fedlight.partitioners",
    "fedlight.peft",
    "fedlight.codecs",
    "fedlight.aggregators",
    "fedlight.privacy",
    "fedlight.attacks",
    "fedlight.client_methods",
    "fedlight.evaluators",
    "fedlight.features",
]


class PluginError(ConfigError):
    """A plugin is unknown, duplicated or malformed; the message says what to change."""


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    cls: type[Plugin]
    provider: str

    @property
    def import_path(self) -> str:
        return f"{self.cls.__module__}.{self.cls.__qualname__}"


@dataclass
class Registry:
    """Every registered plugin class by kind and short name, plus the packages that failed to load."""

    entries: dict[str, dict[str, Entry]] = field(default_factory=lambda: {k: {} for k in KIND_HOOKS})
    failures: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, cls: type, provider: str) -> None:
        base = kinds()[kind][1]
        if not (isinstance(cls, type) and issubclass(cls, base) and issubclass(cls, Plugin)):
            raise PluginError(f"{provider}: {kind} hook returned {cls!r}, which is not a subclass of {base.__name__}")
        name = getattr(cls, "name", "")
        if not name or "name" not in vars(cls):
            raise PluginError(f"{provider}: {cls.__qualname__} must define its own short `name`")
        known = self.entries[kind].get(name)
        if known is not None and known.cls is not cls:
            raise PluginError(
                f"duplicate {kind} plugin name {name!r}: {known.import_path} (from {known.provider}) "
                f"and {cls.__module__}.{cls.__qualname__} (from {provider}); one must be renamed"
            )
        self.entries[kind][name] = Entry(kind, name, cls, provider)

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def get(self, kind: str, name: str) -> Entry:
        """Look up by short name, class name or full import path."""
        table = self.entries[kind]
        if name in table:
            return table[name]
        for entry in table.values():
            if name in (entry.cls.__name__, entry.import_path):
                return entry
        hint = f"; packages that failed to load: {sorted(self.failures)}" if self.failures else ""
        raise PluginError(
            f"unknown {kind[:-1].replace('_', ' ')} {name!r}; available: {', '.join(self.names(kind))}{hint}"
        )

    def find_class(self, cls: type) -> Entry | None:
        for table in self.entries.values():
            for entry in table.values():
                if entry.cls is cls:
                    return entry
        return None


def _builtin_modules() -> list[ModuleType]:
    modules = []
    for package_name in BUILTIN_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__, prefix=package_name + "."):
            module = importlib.import_module(info.name)
            if any(hasattr(module, hook) for hook, _ in KIND_HOOKS.values()):
                modules.append(module)
    return modules


def _distribution_name(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else ep.value.split(":")[0].split(".")[0]


def build_plugin_manager(
    autoload: bool | None = None, extra: list[object] | None = None, builtins: bool = True
) -> tuple[pluggy.PluginManager, dict[str, str], dict[str, str]]:
    """A fresh manager with built-ins (unless ``builtins`` is False), entry points (unless disabled)
    and ``extra`` plugin objects.

    Returns the manager, a map plugin-name -> providing package, and load failures by package.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    providers: dict[str, str] = {}
    failures: dict[str, str] = {}
    for module in _builtin_modules() if builtins else []:
        pm.register(module, name=module.__name__)
        providers[module.__name__] = BUILTIN_PROVIDER
    if autoload is None:
        autoload = autoload_enabled()
    if autoload:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            package = _distribution_name(ep)
            try:
                plugin = ep.load()
                pm.register(plugin, name=f"{package}:{ep.name}")
            except Exception as err:  # a broken plugin must not break unrelated runs
                failures[package] = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}"
                continue
            providers[f"{package}:{ep.name}"] = package
    for i, plugin in enumerate(extra or []):
        name = getattr(plugin, "__name__", f"extra-{i}")
        pm.register(plugin, name=name)
        providers[name] = name
    pm.check_pending()
    return pm, providers, failures


def build_registry(autoload: bool | None = None, extra: list[object] | None = None, builtins: bool = True) -> Registry:
    pm, providers, failures = build_plugin_manager(autoload, extra, builtins)
    registry = Registry(failures=failures)
    for kind, (hook_name, _) in KIND_HOOKS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            provider = providers.get(impl.plugin_name, impl.plugin_name)
            try:
                classes = impl.function()
            except Exception as err:
                registry.failures[provider] = f"{hook_name} raised {type(err).__name__}: {err}"
                continue
            for cls in classes or []:
                registry.add(kind, cls, provider)
    return registry


def engine_commands() -> dict[str, Callable[[list[str]], int]]:
    """``{name: main}`` of every engine subcommand (``fedlight_engines``), e.g. ``flower`` from fedlight-flower.

    Always with entry points: an engine is a separately installed package whatever the test switch says.
    """
    pm, _, _ = build_plugin_manager(autoload=True)
    commands: dict[str, Callable[[list[str]], int]] = {}
    for result in pm.hook.fedlight_engines():
        commands.update(result or {})
    return commands


_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _registry
    if _registry is None:
        _registry = build_registry()
    return _registry


def set_registry(registry: Registry | None) -> None:
    """Replace (or with None, reset) the process-wide registry; tests use this with a fixture."""
    global _registry
    _registry = registry


# --- the built-in index (``fedlight plugins`` without importing a plugin module) ----------------

INDEX_MODULE = "fedlight.plugin_index"


def render_index(registry: Registry | None = None) -> str:
    """The source of :mod:`fedlight.plugin_index`: every built-in plugin's name, import path and summary.

    Generated, never edited: ``python -m fedlight.plugins --write-index``; a test checks it equals
    what the hooks register, so a new or renamed built-in fails the suite until it is regenerated.
    """
    registry = registry or build_registry(autoload=False)
    lines = [
        '"""Generated by ``python -m fedlight.plugins --write-index``; do not edit (tests/test_plugin_index.py checks it).',
        "",
        "Every built-in plugin by kind: (short name, import path, summary), so ``fedlight plugins`` lists them",
        'without importing torch, Lightning or any model library."""',
        "",
        "BUILTINS: dict[str, list[tuple[str, str, str]]] = {",
    ]
    for kind in KIND_HOOKS:
        lines.append(f"    {kind!r}: [")
        for name in registry.names(kind):
            entry = registry.entries[kind][name]
            if entry.provider == BUILTIN_PROVIDER:
                lines.append(f"        ({name!r}, {entry.import_path!r}, {entry.cls.summary()!r}),")
        lines.append("    ],")
    lines.append("}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys
    from pathlib import Path

    if sys.argv[1:] != ["--write-index"]:
        sys.exit("usage: python -m fedlight.plugins --write-index")
    target = Path(__file__).with_name("plugin_index.py")
    target.write_text(render_index(build_registry(autoload=False)))
    print(f"wrote {target}")
