"""Plugin discovery: built-ins through the hooks, third-party through entry points, clear errors."""

from __future__ import annotations

import importlib
import importlib.metadata
import io
import os
import random
import sys
import types

import pytest

from fedlight import plugins
from fedlight.aggregators.base import Aggregator
from fedlight.cli import print_plugins
from fedlight.hookspecs import hookimpl
from fedlight.plugins import KINDS, PluginError, build_registry

BUILTINS = {
    "tasks": {"image_classification", "text_classification"},
    "datasets": {"chatterbot", "digits"},
    "partitioners": {"iid", "dirichlet"},
    "peft_methods": {"lora", "head", "bitfit", "full"},
    "codecs": {"identity"},
    "aggregators": {"fedavg"},
    "privacy": {"none"},
    "attacks": {"sign_flip", "gaussian_noise", "scaling", "alie", "label_flip"},
}


def test_builtins_register_through_the_hooks():
    registry = build_registry(autoload=False)
    for kind, names in BUILTINS.items():
        assert names <= set(registry.names(kind)), kind
        for name in names:
            entry = registry.get(kind, name)
            assert entry.provider == "fedlight"
            assert issubclass(entry.cls, KINDS[kind][1])
            assert entry.cls.summary() != "(no description)"


def test_lookup_by_short_name_class_name_and_import_path():
    registry = build_registry(autoload=False)
    entry = registry.get("peft_methods", "lora")
    assert registry.get("peft_methods", "LoRA") is entry
    assert registry.get("peft_methods", "fedlight.peft.lora.LoRA") is entry


def test_unknown_name_lists_the_available_ones():
    registry = build_registry(autoload=False)
    with pytest.raises(PluginError) as err:
        registry.get("aggregators", "fedavgg")
    assert "fedavgg" in str(err.value) and "fedavg" in str(err.value).split("available:")[1]


class _Dup(Aggregator):
    """A second plugin claiming the name fedavg."""

    name = "fedavg"


def test_duplicate_name_is_an_error_naming_both_providers():
    dup = types.ModuleType("dup_plugin")
    dup.fedlight_aggregators = hookimpl(lambda: [_Dup])
    with pytest.raises(PluginError) as err:
        build_registry(autoload=False, extra=[dup])
    message = str(err.value)
    assert "fedlight.aggregators.fedavg.FedAvg" in message and "_Dup" in message and "dup_plugin" in message


def test_misspelled_hook_fails_loudly():
    bad = types.ModuleType("bad_plugin")
    bad.fedlight_aggregator = hookimpl(lambda: [])  # missing "s"
    with pytest.raises(Exception, match="fedlight_aggregator"):
        build_registry(autoload=False, extra=[bad])


def test_hook_returning_a_non_plugin_is_rejected():
    bad = types.ModuleType("bad_kind")
    bad.fedlight_codecs = hookimpl(lambda: [dict])
    with pytest.raises(PluginError, match="not a subclass of Codec"):
        build_registry(autoload=False, extra=[bad])


class _BrokenEntryPoint:
    name = "broken"
    value = "broken_pkg.plugin"
    dist = types.SimpleNamespace(name="broken-pkg")

    def load(self):
        raise ImportError("No module named 'some_missing_dependency'")


def test_broken_plugin_package_is_reported_and_does_not_break_others(monkeypatch):
    real = importlib.metadata.entry_points

    def fake_entry_points(group=None, **kw):
        found = list(real(group=group, **kw)) if group else []
        return [*found, _BrokenEntryPoint()]

    monkeypatch.setattr(plugins.importlib.metadata, "entry_points", fake_entry_points)
    registry = build_registry(autoload=True)
    assert "broken-pkg" in registry.failures
    assert "some_missing_dependency" in registry.failures["broken-pkg"]
    assert "fedavg" in registry.names("aggregators")  # unrelated plugins still work
    with pytest.raises(PluginError, match="broken-pkg"):
        registry.get("aggregators", "nope")


def test_autoload_switch_is_honoured(monkeypatch):
    calls = []
    monkeypatch.setattr(plugins.importlib.metadata, "entry_points", lambda **kw: calls.append(kw) or [])
    build_registry(autoload=False)
    assert calls == []
    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, "1")
    build_registry()
    assert calls == []


def _example_installed() -> bool:
    try:
        importlib.metadata.distribution("fedlight-example")
        return True
    except importlib.metadata.PackageNotFoundError:
        if os.environ.get("CI"):
            pytest.fail("CI must install plugins/fedlight-example (see .ci/run)")
        pytest.skip("pip install -e plugins/fedlight-example to run the third-party plugin tests")


def test_example_third_party_plugin_is_discovered_through_its_entry_point():
    _example_installed()
    registry = build_registry(autoload=True)
    entry = registry.get("aggregators", "server_lr_fedavg")
    assert entry.provider == "fedlight-example"
    assert entry.cls.__module__ == "fedlight_example.plugin"


# --- lazy registration: a hook returns "module:Class", the class is imported on first use --------------

_LAZY_MODULE = '''
from fedlight import Aggregator


class Mean(Aggregator):
    """Plain mean of the deltas (a lazily registered test plugin).

    More text that is not the summary.
    """

    name = "lazy_mean"

    def aggregate(self, global_state, updates):
        return global_state


class NotAPlugin:
    """Has a name but no plugin base."""

    name = "not_a_plugin"


class Renamed(Aggregator):
    """Its name changes after the class body."""

    name = "before"


Renamed.name = "after"
'''


def _lazy_package(tmp_path, monkeypatch, files: dict[str, str]) -> str:
    """A fresh importable package under tmp_path (unique name); its modules are dropped afterwards."""
    package = f"lazy_pkg_{len(list(tmp_path.iterdir()))}_{os.getpid()}"
    root = tmp_path / package
    root.mkdir()
    (root / "__init__.py").write_text("")
    for name, text in files.items():
        (root / f"{name}.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in [package, *(f"{package}.{name}" for name in files)]:
        monkeypatch.delitem(sys.modules, module, raising=False)
    return package


class _Eager(Aggregator):
    """An eagerly registered class next to a lazy one."""

    name = "eager_mean"


def _hooks(kind_hook: str, *paths: str | type) -> types.ModuleType:
    hooks = types.ModuleType(f"hooks_{abs(hash(paths))}")
    setattr(hooks, kind_hook, hookimpl(lambda: list(paths)))
    return hooks


def test_a_lazy_class_is_listed_from_source_and_imported_only_on_use(tmp_path, monkeypatch):
    pkg = _lazy_package(tmp_path, monkeypatch, {"impl": _LAZY_MODULE})
    registry = build_registry(autoload=False, extra=[_hooks("fedlight_aggregators", f"{pkg}.impl:Mean")])
    entry = registry.entries["aggregators"]["lazy_mean"]
    assert f"{pkg}.impl" not in sys.modules and not entry.loaded
    assert entry.summary == "Plain mean of the deltas (a lazily registered test plugin)."
    assert entry.import_path == f"{pkg}.impl.Mean"
    assert registry.get("aggregators", "Mean") is entry  # by class name: still the lazy entry, now loaded
    assert entry.loaded and f"{pkg}.impl" in sys.modules
    assert issubclass(entry.cls, Aggregator) and entry.cls.summary() == entry.summary
    assert registry.get("aggregators", f"{pkg}.impl.Mean") is entry
    assert registry.find_class(entry.cls) is entry


@pytest.mark.parametrize(
    ("target", "match"),
    [
        ("NotAPlugin", "not a subclass of Aggregator"),
        ("Renamed", "listed as 'before' but its `name` is 'after'"),
    ],
)
def test_a_lazy_class_is_validated_when_used(tmp_path, monkeypatch, target, match):
    pkg = _lazy_package(tmp_path, monkeypatch, {"impl": _LAZY_MODULE})
    registry = build_registry(autoload=False, extra=[_hooks("fedlight_aggregators", f"{pkg}.impl:{target}")])
    name = next(n for n, e in registry.entries["aggregators"].items() if e.import_path == f"{pkg}.impl.{target}")
    with pytest.raises(PluginError, match=match):
        registry.get("aggregators", name)


def test_a_lazy_class_whose_module_cannot_import_fails_on_use_naming_the_package(tmp_path, monkeypatch):
    pkg = _lazy_package(tmp_path, monkeypatch, {"impl": "import some_missing_dependency\n" + _LAZY_MODULE})
    registry = build_registry(autoload=False, extra=[_hooks("fedlight_aggregators", f"{pkg}.impl:Mean")])
    assert "lazy_mean" in registry.names("aggregators")  # listing reads the source only
    with pytest.raises(PluginError) as err:
        registry.get("aggregators", "lazy_mean")
    message = str(err.value)
    assert "ModuleNotFoundError" in message and "some_missing_dependency" in message and "uninstall" in message


def test_a_lazy_path_to_nothing_marks_its_package_failed_in_fedlight_plugins(tmp_path, monkeypatch):
    pkg = _lazy_package(tmp_path, monkeypatch, {"impl": _LAZY_MODULE, "broken": "class Half(:\n"})
    good = _hooks("fedlight_aggregators", f"{pkg}.impl:Mean", _Eager)  # strings and classes mix
    bad = _hooks("fedlight_codecs", "no_such_module_xyz.impl:C")
    for paths, reason in [
        ((f"{pkg}.impl:Missing",), "has no attribute 'Missing'"),
        (("no_such_module_xyz.impl:C",), "no_such_module_xyz"),
        ((f"{pkg}.impl.Mean",), "is not a 'package.module:Class' path"),
        ((f"{pkg}.broken:Half",), "cannot parse module"),
    ]:
        registry = build_registry(autoload=False, extra=[good, _hooks("fedlight_codecs", *paths)])
        (failure,) = registry.failures.values()
        assert reason in failure
        assert "lazy_mean" in registry.names("aggregators")  # the other package still loads

    class _EntryPoint:
        def __init__(self, name, module):
            self.name, self.value, self.module = name, f"{name}_pkg.hooks", module
            self.dist = types.SimpleNamespace(name=f"{name}-pkg", version="1.0", metadata={"Summary": name})

        def load(self):
            return self.module

    monkeypatch.setattr(
        plugins.importlib.metadata,
        "entry_points",
        lambda group=None, **kw: [_EntryPoint("good", good), _EntryPoint("bad", bad)] if group == "fedlight" else [],
    )
    monkeypatch.delenv(plugins.DISABLE_AUTOLOAD_ENV, raising=False)
    sys.modules.pop(f"{pkg}.impl", None)  # the `Missing` case imported it to look
    out = io.StringIO()
    print_plugins(out)
    text = out.getvalue()
    assert f"  {'lazy_mean':<22} Plain mean of the deltas (a lazily registered test plugin).  [good-pkg]" in text
    assert f"  {'eager_mean':<22} An eagerly registered class next to a lazy one.  [good-pkg]" in text
    assert "failed to load plugin package bad-pkg: fedlight_codecs returned" in text and "no_such_module_xyz" in text
    assert f"{pkg}.impl" not in sys.modules


def _random_plugin_source(rng: random.Random, i: int) -> tuple[str, bool]:
    """A plugin class with a generated docstring and ``name`` statement; whether the name is a literal."""
    words = ["Mean", "of", "deltas", "—", "λ·Δ", "'quoted'", '"double"', "(Paper 2021).", "x\\\\y", "tab\\there"]
    summary = " ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) + " end."
    doc = rng.choice(
        [
            "",
            f'    """{summary}"""\n',
            f'    """\n    {summary}\n\n    Body text.\n    """\n',
            f"    '''   {summary}   '''\n",
            f'    r"""{summary}\n    second line"""\n',
        ]
    )
    literal = rng.random() < 0.7
    name = f"gen_{i}"
    name_stmt = rng.choice(
        [f'    name = "{name}"\n', f"    name: ClassVar[str] = '{name}'\n", f'    name = ("{name}")\n']
        if literal
        else [f'    name = "gen_" + "{i}"\n', f'    name = f"gen_{{{i}}}"\n', "    name = NAME\n", ""]
    )
    before = rng.choice(["", "    example_args = {}\n", "    x: int\n"])
    body = doc + before + name_stmt + "\n    def aggregate(self, global_state, updates):\n        return global_state\n"
    cls = f"class Gen(Aggregator):\n{body}"
    wrapper = rng.choice(["plain", "if", "try", "if-else"])  # module-level definitions the reader must find
    if wrapper != "plain":
        cls = "\n".join("    " + line if line else line for line in cls.splitlines()) + "\n"
        cls = {
            "if": f"if NAME:\n{cls}",
            "try": f"try:\n{cls}except ImportError:\n    pass\n",
            "if-else": f"if NAME:\n{cls}else:\n{cls}",  # two definitions: the reader defers to the import
        }[wrapper]
        literal = literal and wrapper != "if-else"
    source = f"from typing import ClassVar\n\nfrom fedlight import Aggregator\n\nNAME = {name!r}\n\n\n{cls}"
    return source, literal


def test_reading_a_class_from_source_agrees_with_importing_it(tmp_path, monkeypatch):
    """Generated docstrings and ``name`` statements: the static read equals the imported class, or defers."""
    rng = random.Random(18)
    cases = [_random_plugin_source(rng, i) for i in range(40)]
    pkg = _lazy_package(tmp_path, monkeypatch, {f"m{i}": source for i, (source, _) in enumerate(cases)})
    for i, (_, literal) in enumerate(cases):
        path = f"{pkg}.m{i}:Gen"
        read = plugins._read_lazy(path)
        assert (read is not None) == literal, path
        cls = importlib.import_module(f"{pkg}.m{i}").Gen
        if read is not None:
            assert read == (cls.name, cls.summary()), path
        registry = plugins.Registry()
        if "name" not in vars(cls):  # the source cannot tell and the import shows it has none
            with pytest.raises(PluginError, match="must define its own short `name`"):
                registry.add("aggregators", path, "gen")
            continue
        registry.add("aggregators", path, "gen")
        (entry,) = registry.entries["aggregators"].values()
        assert (entry.name, entry.summary, entry.cls) == (cls.name, cls.summary(), cls)


@pytest.mark.parametrize(
    ("module", "target", "expected"),
    [
        ("import some_missing_dependency\n" + _LAZY_MODULE, "Mean", ["some_missing_dependency", "uninstall"]),
        (_LAZY_MODULE, "NotAPlugin", ["not a subclass of Aggregator"]),
    ],
)
def test_fit_with_a_broken_lazy_class_is_one_clear_error_before_training(
    tmp_path, monkeypatch, capsys, module, target, expected
):
    import yaml
    from conftest import vision_config

    from fedlight.cli import main

    pkg = _lazy_package(tmp_path, monkeypatch, {"impl": module})
    registry = build_registry(autoload=False, extra=[_hooks("fedlight_aggregators", f"{pkg}.impl:{target}")])
    name = next(n for n, e in registry.entries["aggregators"].items() if e.import_path == f"{pkg}.impl.{target}")
    plugins.set_registry(registry)
    try:
        cfg = vision_config(tmp_path, federation={"aggregator": {"class_path": name}})
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert main(["fit", "--config", str(path), "--trainer.logger", "false"]) == 2
    finally:
        plugins.set_registry(None)
    err = capsys.readouterr().err
    assert "fedlight: error: federation.aggregator" in err and all(e in err for e in expected), err[-2000:]
    assert "Traceback" not in err and not (tmp_path / "runs").exists()
