"""The plugin-author API: the example plugin needs only ``fedlight``; fedlight.testing's contracts hold for
fedlight's own plugins and for the example package, run the way a third-party package runs them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from fedlight import testing
from fedlight.plugins import build_registry

EXAMPLE = Path(__file__).parents[1] / "plugins" / "fedlight-example" / "src" / "fedlight_example"
REGISTRY = build_registry(autoload=False)
CONTRACTS = [
    (kind, entry.cls, check)
    for kind in testing.CHECKS
    for entry in REGISTRY.entries[kind].values()
    for check in testing.checks_for(kind)
]


@pytest.mark.parametrize(("kind", "cls", "check"), CONTRACTS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_builtin_plugins_pass_the_published_contract(kind, cls, check):
    check(cls)


def test_the_example_plugin_imports_only_the_public_api():
    for path in EXAMPLE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedlight"):
                assert node.module in ("fedlight", "fedlight_example"), f"{path.name} imports {node.module}"


def test_a_third_party_package_runs_the_contract_on_its_plugins():
    pytest.importorskip("fedlight_example")
    assert testing.check_registered("fedlight-example") == len(testing.AGGREGATOR_CHECKS)


def test_the_contract_catches_a_broken_plugin():
    from fedlight import Aggregator

    class Forgetful(Aggregator):
        """Averages, but forgets its server state on load (a resume bug)."""

        name = "forgetful"

        def __init__(self) -> None:
            self.steps = 0

        def aggregate(self, global_state, updates):
            if not updates:
                raise ValueError("needs at least one update")
            self.steps += 1
            return {k: v + self.steps for k, v in global_state.items()}

        def state_dict(self):
            return {"steps": self.steps}

        def load_state_dict(self, state):
            self.steps = 0

    with pytest.raises(AssertionError, match="resumed"):
        testing.check_aggregator_resumes_exactly(Forgetful)


def test_import_fedlight_is_light():
    """The public API resolves lazily: importing fedlight pulls in neither Lightning nor torch."""
    code = "import sys, fedlight; assert 'lightning' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
