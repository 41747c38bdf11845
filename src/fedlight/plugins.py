"""Plugin manager and registry: built-ins and entry points, loaded the same way.

Built-in modules are registered explicitly (never as an import side effect); third-party modules
come from the ``fedlight`` entry-point group, loaded one by one so a broken package is reported by
name instead of stopping every run. ``FEDLIGHT_DISABLE_PLUGIN_AUTOLOAD=1`` skips entry points
(tests use it to be independent of what happens to be installed).

A hook may return a class or a ``"module:Class"`` string. A string is registered *lazily*: its short
``name`` and summary are read from the module's source (``ast``, found with ``importlib.util.find_spec``)
without importing it, and the class is imported and validated on first real use (``Entry.cls``,
``Registry.get``: resolving a config). So a plugin package whose hook module imports nothing heavy
keeps ``fedlight plugins`` fast, exactly as fedlight's generated index does for the built-ins.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
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


@dataclass(eq=False)
class Entry:
    """One registered plugin class: ``target`` is the class, or for a lazy registration its
    ``"module:Class"`` path, imported and validated the first time :attr:`cls` is read."""

    kind: str
    name: str
    target: type[Plugin] | str
    provider: str
    summary: str

    @property
    def import_path(self) -> str:
        if isinstance(self.target, str):
            return self.target.replace(":", ".")
        return f"{self.target.__module__}.{self.target.__qualname__}"

    @property
    def loaded(self) -> bool:
        return not isinstance(self.target, str)

    @property
    def cls(self) -> type[Plugin]:
        if isinstance(self.target, str):
            self.target = _load_lazy(self)
        return self.target


def _check_class(kind: str, cls: object, provider: str) -> type[Plugin]:
    """``cls``, after checking it subclasses the kind's base and defines its own short ``name``."""
    base = kinds()[kind][1]
    if not (isinstance(cls, type) and issubclass(cls, base) and issubclass(cls, Plugin)):
        raise PluginError(f"{provider}: {kind} hook returned {cls!r}, which is not a subclass of {base.__name__}")
    name = getattr(cls, "name", "")
    if not name or "name" not in vars(cls):
        raise PluginError(f"{provider}: {cls.__qualname__} must define its own short `name`")
    return cls


class _NotFound(Exception):
    """A lazy ``"module:Class"`` path cannot be listed (no such module or class, a syntax error): its package failed."""


def _module_level_classes(body: list[ast.stmt]) -> list[ast.ClassDef]:
    """Classes a module defines when it runs: top-level ones and those under ``if``/``try``/``with``."""
    out: list[ast.ClassDef] = []
    for stmt in body:
        if isinstance(stmt, ast.ClassDef):
            out.append(stmt)
        elif isinstance(stmt, (ast.If, ast.Try, ast.With)):
            blocks = [stmt.body, getattr(stmt, "orelse", []), getattr(stmt, "finalbody", [])]
            blocks += [h.body for h in getattr(stmt, "handlers", [])]
            out += [c for block in blocks for c in _module_level_classes(block)]
    return out


def _read_lazy(path: str) -> tuple[str, str] | None:
    """``(name, summary)`` of the class at ``"module:Class"``, read from its source without importing it.

    None when the source cannot tell (no source file, a nested class, no single module-level definition,
    a ``name`` that is not a string literal in the class body): the caller then imports the class to read
    them, and a class that is not there after all marks its package failed.
    """
    module, sep, qualname = path.partition(":")
    if not sep or not module or not qualname:
        raise _NotFound(f"{path!r} is not a 'package.module:Class' path")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as err:  # a missing parent package, or an import error in it
        raise _NotFound(f"cannot find module {module!r} of {path!r}: {type(err).__name__}: {err}") from err
    if spec is None:
        raise _NotFound(f"no module named {module!r} (from {path!r})")
    try:
        source = spec.loader.get_source(spec.name) if spec.loader is not None else None  # type: ignore[attr-defined]
    except (AttributeError, ImportError, OSError):
        source = None
    if source is None or "." in qualname:
        return None
    try:
        tree = ast.parse(source)
    except SyntaxError as err:
        raise _NotFound(f"cannot parse module {module!r} of {path!r}: {err}") from err
    found = [c for c in _module_level_classes(tree.body) if c.name == qualname]
    if len(found) != 1:  # none at module level, or one per branch of an ``if``: importing decides
        return None
    node, name = found[0], None
    for stmt in node.body:
        targets = (
            stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(stmt, ast.AnnAssign) else []
        )
        value = getattr(stmt, "value", None)
        if any(isinstance(t, ast.Name) and t.id == "name" for t in targets):
            name = value.value if isinstance(value, ast.Constant) and isinstance(value.value, str) else None
    if not name:
        return None
    doc = (ast.get_docstring(node, clean=False) or "").strip()  # as Plugin.summary reads ``__doc__``
    return name, doc.splitlines()[0] if doc else "(no description)"


def _import_class(path: str, provider: str, what: str) -> type:
    module, _, qualname = path.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except Exception as err:
        raise PluginError(
            f"{provider}: cannot import {what} {path!r}: {type(err).__name__}: {err}; install what it needs, "
            f"or uninstall {provider}"
        ) from err
    return obj


def _load_lazy(entry: Entry) -> type[Plugin]:
    """Import a lazily registered class and check it is what its source said (base class, own ``name``)."""
    assert isinstance(entry.target, str)
    cls = _import_class(entry.target, entry.provider, f"{entry.kind[:-1].replace('_', ' ')} {entry.name!r}")
    plugin = _check_class(entry.kind, cls, entry.provider)
    if plugin.name != entry.name:
        raise PluginError(
            f"{entry.provider}: {entry.target} was listed as {entry.name!r} but its `name` is {plugin.name!r}"
        )
    return plugin


@dataclass
class Registry:
    """Every registered plugin class by kind and short name, plus the packages that failed to load."""

    entries: dict[str, dict[str, Entry]] = field(default_factory=lambda: {k: {} for k in KIND_HOOKS})
    failures: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, cls: type | str, provider: str) -> None:
        """Register a class, or lazily a ``"module:Class"`` path (read without importing, see :func:`_read_lazy`)."""
        if isinstance(cls, str):
            read = _read_lazy(cls)
            if read is not None:
                self._put(Entry(kind, read[0], cls, provider, read[1]))
                return
            try:  # the source cannot tell its name and summary: import it to read them
                cls = _import_class(cls, provider, f"{kind} class")
            except PluginError as err:
                raise _NotFound(str(err)) from err
        plugin = _check_class(kind, cls, provider)
        self._put(Entry(kind, plugin.name, plugin, provider, plugin.summary()))

    def _put(self, entry: Entry) -> None:
        known = self.entries[entry.kind].get(entry.name)
        if known is not None and known.import_path != entry.import_path:
            raise PluginError(
                f"duplicate {entry.kind} plugin name {entry.name!r}: {known.import_path} (from {known.provider}) "
                f"and {entry.import_path} (from {entry.provider}); one must be renamed"
            )
        self.entries[entry.kind][entry.name] = entry

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def get(self, kind: str, name: str) -> Entry:
        """Look up by short name, class name or full import path; a lazy entry is imported and checked here."""
        table = self.entries[kind]
        entry = table.get(name)
        if entry is None:
            entry = next((e for e in table.values() if name in (e.import_path.rsplit(".", 1)[-1], e.import_path)), None)
        if entry is None:
            hint = f"; packages that failed to load: {sorted(self.failures)}" if self.failures else ""
            raise PluginError(
                f"unknown {kind[:-1].replace('_', ' ')} {name!r}; available: {', '.join(self.names(kind))}{hint}"
            )
        entry.cls  # noqa: B018 -- first real use: import and validate a lazy registration
        return entry

    def find_class(self, cls: type) -> Entry | None:
        path = f"{cls.__module__}.{cls.__qualname__}"
        for table in self.entries.values():
            for entry in table.values():
                if entry.import_path == path and entry.cls is cls:
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
                try:
                    registry.add(kind, cls, provider)
                except _NotFound as err:  # a lazy path to nothing: that package is broken, the others still load
                    registry.failures[provider] = f"{hook_name} returned {cls!r}: {err}"
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
                lines.append(f"        ({name!r}, {entry.import_path!r}, {entry.summary!r}),")
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
