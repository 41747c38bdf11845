"""Start-up: ``fedlight --help`` and ``fedlight plugins`` answer without importing torch or Lightning
(with the installed plugin packages too, when they register their classes by ``"module:Class"`` path).

Built-ins are listed from the generated ``fedlight.plugin_index``; it must equal what the hooks
register (regenerate with ``python -m fedlight.plugins --write-index``).
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

from fedlight.plugins import BUILTIN_PROVIDER, build_registry, render_index

HEAVY = ("torch", "lightning", "transformers", "timm", "peft")


def run_main(args: list[str], autoload: bool) -> tuple[str, list[str]]:
    """``fedlight.cli.main(args)`` in a fresh interpreter: its output and the heavy modules it imported."""
    code = (
        "import sys; from fedlight.cli import main; code = main(sys.argv[1:]); "
        f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules)); sys.exit(code)"
    )
    env = {**os.environ, "FEDLIGHT_DISABLE_PLUGIN_AUTOLOAD": "0" if autoload else "1"}
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120, check=True
    )
    body, _, heavy = out.stdout.rpartition("HEAVY ")
    return body, eval(heavy)


def test_the_index_is_what_the_hooks_register():
    source = Path(__file__).parents[1] / "src" / "fedlight" / "plugin_index.py"
    assert source.read_text() == render_index(build_registry(autoload=False)), (
        "src/fedlight/plugin_index.py is stale: run `python -m fedlight.plugins --write-index`"
    )


def test_plugins_lists_every_builtin_without_importing_torch_or_lightning():
    out, heavy = run_main(["plugins"], autoload=False)
    assert heavy == []
    registry = build_registry(autoload=False)
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    for kind, table in registry.entries.items():
        assert f"{kind}:" in out
        for name, entry in table.items():
            assert entry.provider == BUILTIN_PROVIDER
            assert name in listed
            assert f"  {name:<22} {entry.cls.summary()}  [{BUILTIN_PROVIDER}]" in out


def test_plugins_still_lists_installed_plugin_packages_classes():
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="fedlight")}
    if "example" not in eps:
        import pytest

        pytest.skip("fedlight-example is not installed (pip install -e plugins/fedlight-example)")
    out, heavy = run_main(["plugins"], autoload=True)
    assert heavy == []  # fedlight-example registers its class by path: listed from source, not imported
    registry = build_registry(autoload=True)
    third_party = [(n, e) for t in registry.entries.values() for n, e in t.items() if e.provider != BUILTIN_PROVIDER]
    assert third_party
    for name, entry in third_party:
        assert f"  {name:<22} {entry.cls.summary()}  [{entry.provider}]" in out


def test_top_level_help_names_every_command_without_lightning():
    out, heavy = run_main(["--help"], autoload=True)
    assert heavy == []
    for command in ("fit", "validate", "test", "predict", "plugins", "partitions", "report", "evaluate"):
        assert f"\n  {command} " in out
