"""Plugin discovery: built-ins through the hooks, third-party through entry points, clear errors."""

from __future__ import annotations

import importlib.metadata
import os
import types

import pytest

from fedlight import plugins
from fedlight.aggregators.base import Aggregator
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
