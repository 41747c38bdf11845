"""What a run imports: a timm + BitFit ``fit`` pays for neither peft nor transformers' model stack.

peft is imported when a peft-library method is applied, not when its module is (the built-ins name
their config class, e.g. ``config_class = "LoraConfig"``); a plugin may still set a class.
"""

from __future__ import annotations

import subprocess
import sys

import peft
import pytest
from torch import nn

from fedlight.peft.lora import LoRA


def test_building_the_registry_and_the_module_does_not_import_peft():
    """Every built-in plugin module (as ``fit`` imports them to resolve short names) and FederatedModule."""
    code = (
        "import sys; import fedlight.core.module; from fedlight.plugins import build_registry; "
        "r = build_registry(autoload=False); assert 'lora' in r.names('peft_methods'); "
        "print(sorted(m for m in ('peft', 'transformers.modeling_utils') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


class _ClassConfigLoRA(LoRA):
    """LoRA with its config class set as a class, as a third-party subclass may do."""

    name = "class_config_lora"
    config_class = peft.LoraConfig


@pytest.mark.parametrize("cls", [LoRA, _ClassConfigLoRA])
def test_a_config_class_by_name_or_by_class_builds_the_same_peft_config(cls):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    config = cls(r=2, alpha=4, target=["0"]).peft_config(model, ["2"])
    assert type(config) is peft.LoraConfig
    assert (config.r, config.lora_alpha, set(config.modules_to_save or [])) == (2, 4, {"2"})
