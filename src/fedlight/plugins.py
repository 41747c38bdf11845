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
from dataclasses import dataclass, field
from types import ModuleType

import pluggy

from fedlight import hookspecs
from fedlight.aggregators.base import Aggregator
from fedlight.attacks.base import Attack
from fedlight.client_methods.base import ClientMethod
from fedlight.codecs.base import Codec
from fedlight.data.base import Dataset
from fedlight.errors import ConfigError
from fedlight.evaluators.base import Evaluator
from fedlight.features.base import RoundFeature
from fedlight.partitioners.base import Partitioner
from fedlight.peft.base import PeftMethod
from fedlight.privacy.base import Privacy
from fedlight.tasks.base import Task

ENTRY_POINT_GROUP = "fedlight"
DISABLE_AUTOLOAD_ENV = "FEDLIGHT_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN_PROVIDER = "fedlight"


def autoload_enabled() -> bool:
    """Whether entry-point plugins load (``FEDLIGHT_DISABLE_PLUGIN_AUTOLOAD=1|true|yes`` turns it off)."""
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "") not in ("1", "true", "yes")

#: kind -> (hook name, base class). Adding a kind is one line here plus one hookspec.
KINDS: dict[str, tuple[str, type]] = {
    "tasks": ("fedlight_tasks", Task),
    "datasets": ("fedlight_datasets", Dataset),
    "partitioners": ("fedlight_partitioners", Partitioner),
    "peft_methods": ("fedlight_peft_methods", PeftMethod),
    "codecs": ("fedlight_codecs", Codec),
    "aggregators": ("fedlight_aggregators", Aggregator),
    "privacy": ("fedlight_privacy", Privacy),
    "attacks": ("fedlight_attacks", Attack),
    "client_methods": ("fedlight_client_methods", ClientMethod),
    "evaluators": ("fedlight_evaluators", Evaluator),
    "round_features": ("fedlight_round_features", RoundFeature),
}

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
    cls: type
    provider: str

    @property
    def import_path(self) -> str:
        return f"{self.cls.__module__}.{self.cls.__qualname__}"


@dataclass
class Registry:
    """Every registered plugin class by kind and short name, plus the packages that failed to load."""

    entries: dict[str, dict[str, Entry]] = field(default_factory=lambda: {k: {} for k in KINDS})
    failures: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, cls: type, provider: str) -> None:
        base = KINDS[kind][1]
        if not (isinstance(cls, type) and issubclass(cls, base)):
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
        raise PluginError(f"unknown {kind[:-1].replace('_', ' ')} {name!r}; available: {', '.join(self.names(kind))}{hint}")

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
            if any(hasattr(module, hook) for hook, _ in KINDS.values()):
                modules.append(module)
    return modules


def _distribution_name(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else ep.value.split(":")[0].split(".")[0]


def build_plugin_manager(
    autoload: bool | None = None, extra: list[object] | None = None
) -> tuple[pluggy.PluginManager, dict[str, str], dict[str, str]]:
    """A fresh manager with built-ins, entry points (unless disabled) and ``extra`` plugin objects.

    Returns the manager, a map plugin-name -> providing package, and load failures by package.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    providers: dict[str, str] = {}
    failures: dict[str, str] = {}
    for module in _builtin_modules():
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


def build_registry(autoload: bool | None = None, extra: list[object] | None = None) -> Registry:
    pm, providers, failures = build_plugin_manager(autoload, extra)
    registry = Registry(failures=failures)
    for kind, (hook_name, _) in KINDS.items():
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


def engine_commands() -> dict[str, object]:
    """``{name: main}`` of every engine subcommand (``fedlight_engines``), e.g. ``flower`` from fedlight-flower.

    Always with entry points: an engine is a separately installed package whatever the test switch says.
    """
    pm, _, _ = build_plugin_manager(autoload=True)
    commands: dict[str, object] = {}
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
