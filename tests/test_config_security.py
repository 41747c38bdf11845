"""Configs never execute anything that is not allowed.

A generated table (positions x payloads x YAML/command-line form) runs the real CLI on each hostile
config and asserts a clear refusal and that nothing ran: the payloads would create marker files (a
module in the current directory creates one when imported, ``subprocess.Popen`` / ``os.system`` when
called). Positive controls show the same positions work for allowed names, and that
``FEDLIGHT_ALLOWED_MODULES`` extends the list (and un-extends it when unset).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import merge, vision_config

from fedlight import config_guard
from fedlight.cli import load_config, main, run_cli
from fedlight.errors import ConfigError

EVIL = "fedlight_evil_mod"  # written into the test's cwd; importing it creates IMPORTED, calling it CALLED
EVIL_SOURCE = """
import pathlib
pathlib.Path(__file__).with_name("IMPORTED").touch()
def touch(*args, **kwargs):
    pathlib.Path(__file__).with_name("CALLED").touch()
class Hook:
    def __init__(self, *args, **kwargs):
        touch()
"""
GOOD = "fedlight_good_mod"  # an allowed-by-environment module for the positive controls
GOOD_SOURCE = """
from lightning.pytorch.callbacks import Callback
def constant(epoch):
    return 1.0
def hook(trainer, module):
    pass
class Marker(Callback):
    pass
"""


def payloads(marker: Path) -> dict[str, tuple[str, dict]]:
    """name -> (import path, init_args that would create ``marker`` if the object were built/called)."""
    touch = f"touch {marker}"
    return {
        "os.system": ("os.system", {"command": touch}),
        "subprocess.Popen": ("subprocess.Popen", {"args": ["touch", str(marker)]}),
        "builtins.eval": ("builtins.eval", {"source": f"open({str(marker)!r}, 'w')"}),
        "importlib.import_module": ("importlib.import_module", {"name": EVIL}),
        "chain-fedlight": ("fedlight.cli.os.system", {"command": touch}),  # reachable, defined in posix
        "chain-torch": ("torch.optim.sgd.torch.load", {"f": str(marker)}),  # defined in torch.serialization
        "cwd-module": (f"{EVIL}.Hook", {}),
        "cwd-function": (f"{EVIL}.touch", {}),
    }


def _spec(path: str, init: dict) -> dict:
    return {"class_path": path, "init_args": init} if init else {"class_path": path}


SGD = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}
LAMBDA_CB = "lightning.pytorch.callbacks.LambdaCallback"

# position -> (yaml overrides, command-line args) for an import path P and its init_args I
POSITIONS = {
    "callback": (
        lambda p, i: {"trainer": {"callbacks": [_spec(p, i)]}},
        lambda p, i: [f"--trainer.callbacks+={p}"],
    ),
    "callback-list": (
        lambda p, i: {"trainer": {"callbacks": [p]}},
        lambda p, i: [f"--trainer.callbacks={json.dumps([_spec(p, i)])}"],
    ),
    "lambda-callback-hook": (
        lambda p, i: {"trainer": {"callbacks": [{"class_path": LAMBDA_CB, "init_args": {"on_fit_start": p}}]}},
        lambda p, i: [f"--trainer.callbacks+={LAMBDA_CB}", f"--trainer.callbacks.on_fit_start={p}"],
    ),
    "lr-lambda": (
        lambda p, i: {
            "optimizer": SGD,
            "lr_scheduler": {"class_path": "torch.optim.lr_scheduler.LambdaLR", "init_args": {"lr_lambda": p}},
        },
        lambda p, i: [
            "--optimizer=torch.optim.SGD",
            "--optimizer.lr=0.1",
            "--lr_scheduler=torch.optim.lr_scheduler.LambdaLR",
            f"--lr_scheduler.lr_lambda={p}",
        ],
    ),
    "optimizer": (lambda p, i: {"optimizer": _spec(p, i)}, lambda p, i: ["--optimizer", p]),
    "logger": (lambda p, i: {"trainer": {"logger": _spec(p, i)}}, lambda p, i: [f"--trainer.logger={p}"]),
    "trainer-plugins": (
        lambda p, i: {"trainer": {"plugins": [_spec(p, i)]}},
        lambda p, i: [f"--trainer.plugins+={p}"],
    ),
    "plugin-key": (lambda p, i: {"model": {"peft": _spec(p, i)}}, lambda p, i: ["--model.peft", p]),
    "nested-plugin": (
        lambda p, i: {"federation": {"uplink_codec": {"class_path": "compress", "init_args": {"inner": p}}}},
        lambda p, i: ["--federation.uplink_codec=compress", "--federation.uplink_codec.init_args.inner", p],
    ),
    "any-typed-dict": (
        lambda p, i: {"model": {"task": {"init_args": {"model_kwargs": {"act_layer": _spec(p, i)}}}}},
        lambda p, i: [f"--model.task.init_args.model_kwargs={json.dumps({'act_layer': _spec(p, i)})}"],
    ),
}
PAYLOAD_NAMES = list(payloads(Path("m")))
CASES = [(pos, name, form) for pos in POSITIONS for name in PAYLOAD_NAMES for form in ("yaml", "cli")]
# the default run takes one payload per (position, form), rotating so each payload is tried 2-3 times;
# `-m slow` runs the whole cross product
SAMPLE = {
    (pos, PAYLOAD_NAMES[(2 * i + j) % len(PAYLOAD_NAMES)], form)
    for i, pos in enumerate(POSITIONS)
    for j, form in enumerate(("yaml", "cli"))
}
PARAMS = [pytest.param(*case, id="-".join(case), marks=() if case in SAMPLE else pytest.mark.slow) for case in CASES]


@pytest.fixture
def hostile_cwd(tmp_path, monkeypatch):
    """A cwd holding an importable hostile module (it really is importable: sys.path has the cwd)."""
    (tmp_path / f"{EVIL}.py").write_text(EVIL_SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(EVIL, None)
    import importlib.util

    assert importlib.util.find_spec(EVIL) is not None
    yield tmp_path
    sys.modules.pop(EVIL, None)


def _run_main(args: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("position", "payload", "form"), PARAMS)
def test_hostile_config_is_refused_and_nothing_runs(position, payload, form, hostile_cwd, capsys):
    marker = hostile_cwd / "MARKER"
    path, init = payloads(marker)[payload]
    as_yaml, as_cli = POSITIONS[position]
    cfg = vision_config(hostile_cwd)
    extra: list[str] = []
    if form == "yaml":
        cfg = merge(cfg, as_yaml(path, init))
    else:
        extra = as_cli(path, init)
    (hostile_cwd / "hostile.yaml").write_text(yaml.safe_dump(cfg))
    code, err = _run_main(["fit", "--config", str(hostile_cwd / "hostile.yaml"), *extra], capsys)
    assert code == 2, err[-3000:]
    message = " ".join(err.split())
    assert "fedlight: error:" in message and "Traceback" not in err
    assert "is not allowed" in message or "unknown" in message, message[-1500:]
    assert "FEDLIGHT_ALLOWED_MODULES" in message or "available:" in message
    assert EVIL not in sys.modules, "the hostile module was imported"
    for name in ("MARKER", "IMPORTED", "CALLED"):
        assert not (hostile_cwd / name).exists(), f"{name} written: the payload ran"
    assert not list(hostile_cwd.rglob("rounds.csv")), "training started"


def test_the_hostile_table_is_large():
    assert len(CASES) >= 150
    assert len(POSITIONS) >= 10 and len(PAYLOAD_NAMES) >= 8
    assert {p for _, p, _ in SAMPLE} == set(PAYLOAD_NAMES) and {(p, f) for p, _, f in SAMPLE} == {
        (p, f) for p, _, f in CASES
    }


# ------------------------------------------------------------------------------ positive controls


@pytest.fixture
def good_module(tmp_path, monkeypatch):
    (tmp_path / f"{GOOD}.py").write_text(GOOD_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(config_guard.ALLOWED_MODULES_ENV, GOOD)
    yield tmp_path
    sys.modules.pop(GOOD, None)


def _build(tmp_path: Path, cfg: dict, *extra: str):
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return run_cli(["--config", str(path), "--trainer.logger", "false", *extra], run=False)


def test_allowed_callables_and_callbacks_work_in_the_same_positions(good_module):
    """The refusals above are not a broken parser: allowed names in the same positions build."""
    cfg = merge(vision_config(good_module), POSITIONS["lr-lambda"][0](f"{GOOD}.constant", {}))
    cli = _build(
        good_module, cfg,
        f"--trainer.callbacks+={LAMBDA_CB}", f"--trainer.callbacks.on_fit_start={GOOD}.hook",
        f"--trainer.callbacks+={GOOD}.Marker",
    )  # fmt: skip
    import fedlight_good_mod as good

    hooks = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "LambdaCallback"]
    assert hooks and hooks[0].on_fit_start is good.hook
    assert any(isinstance(cb, good.Marker) for cb in cli.trainer.callbacks)
    assert cli.config["lr_scheduler"]["init_args"]["lr_lambda"] is good.constant


def test_allow_list_extension_is_withdrawn_when_the_variable_is_unset(good_module, monkeypatch, capsys):
    cfg = merge(vision_config(good_module), {"trainer": {"callbacks": [{"class_path": f"{GOOD}.Marker"}]}})
    _build(good_module, cfg)
    monkeypatch.delenv(config_guard.ALLOWED_MODULES_ENV)
    with pytest.raises(ConfigError, match=f"'{GOOD}.Marker' is not allowed"):
        _build(good_module, cfg)
    with pytest.raises(ConfigError, match=f"'{GOOD}.Marker' is not allowed"):  # command-line form too
        _build(good_module, vision_config(good_module), f"--trainer.callbacks+={GOOD}.Marker")


def test_allowed_prefix_is_judged_by_where_the_object_is_defined():
    """``fedlight.x`` is allowed, but not everything reachable from it by attribute access."""
    assert config_guard.is_allowed("fedlight.cli.os.system")  # the name passes the first check ...
    import jsonargparse

    config_guard.install()
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    from collections.abc import Callable

    parser.add_argument("--fn", type=Callable)
    assert parser.parse_args(["--fn", "fedlight.config_guard.safe_load"]).fn is config_guard.safe_load
    for path in ("fedlight.cli.os.system", "fedlight.config_guard.yaml.unsafe_load", "torch.optim.sgd.torch.load"):
        with pytest.raises(jsonargparse.ArgumentError, match="is not allowed"):  # ... where it is defined does not
            parser.parse_args(["--fn", path])


# ------------------------------------------------------------------------------ python -m fedlight


def test_python_m_fedlight_does_not_import_from_the_current_directory(hostile_cwd):
    """Even with the module allow-listed, ``-m`` must not make a file in the cwd importable."""
    cfg = merge(vision_config(hostile_cwd), {"trainer": {"callbacks": [{"class_path": f"{EVIL}.Hook"}]}})
    (hostile_cwd / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {
        "PATH": "/usr/bin:/bin", "FEDLIGHT_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1",
        config_guard.ALLOWED_MODULES_ENV: EVIL, "HOME": str(hostile_cwd),
    }  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "fedlight", "fit", "--config", "cfg.yaml"],
        cwd=hostile_cwd, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "fedlight: error:" in result.stderr and EVIL in result.stderr, result.stderr[-2000:]
    assert not (hostile_cwd / "IMPORTED").exists() and not (hostile_cwd / "CALLED").exists()


def test_package_model_path_never_imports_a_stray_module(hostile_cwd, capsys):
    """``package:NAME`` must name an installed distribution, not any importable module."""
    from fedlight.tasks.base import resolve_local_path

    for name in (EVIL, "antigravity", "os"):
        with pytest.raises(FileNotFoundError, match=f"model package '{name}' is not installed"):
            resolve_local_path(f"package:{name}")
    assert EVIL not in sys.modules and not (hostile_cwd / "IMPORTED").exists()


# ------------------------------------------------------------------------------ checkpoint hyper_parameters


def test_checkpoint_hyper_parameters_never_reach_the_parser(tmp_path, hostile_cwd, capsys):
    """fedlight checkpoints carry no hyper_parameters; a crafted one's are ignored with a warning."""
    cfg = merge(vision_config(tmp_path), {"federation": {"rounds": 1, "local_steps": 1}})
    cfg["trainer"]["logger"]["init_args"]["name"] = "hp"
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_cli(["fit", "--config", str(path)])
    (last,) = list((tmp_path / "runs").rglob("last.ckpt"))
    checkpoint = torch.load(last, weights_only=True)
    assert "hyper_parameters" not in checkpoint and "datamodule_hyper_parameters" not in checkpoint

    # LightningCLI would parse these over the YAML: lr -> 99 silently, and import a class from the cwd
    checkpoint["hyper_parameters"] = {"lr": 99.0, "peft": {"class_path": f"{EVIL}.Hook"}}
    checkpoint["datamodule_hyper_parameters"] = {"batch_size": 1}
    crafted = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, crafted)
    with pytest.warns(UserWarning, match="carries datamodule_hyper_parameters and hyper_parameters; ignored"):
        cli = run_cli(["fit", "--config", str(path), "--ckpt_path", str(crafted)])
    assert cli.model.lr == cfg["model"]["lr"] and cli.datamodule.batch_size == cfg["data"]["batch_size"]
    assert EVIL not in sys.modules and not (hostile_cwd / "IMPORTED").exists()


# ------------------------------------------------------------------------------ bounded YAML


def _alias_bomb(levels: int, fanout: int, mapping: bool) -> str:
    lines = ["a0: &a0 [x]"]
    for level in range(1, levels):
        refs = ", ".join([f"*a{level - 1}"] * fanout)
        lines.append(
            f"a{level}: &a{level} "
            + ("{" + ", ".join(f"k{j}: *a{level - 1}" for j in range(fanout)) + "}" if mapping else f"[{refs}]")
        )
    return "\n".join(lines) + f"\nmodel: {{task: {{init_args: {{model_kwargs: {{x: *a{levels - 1}}}}}}}}}\n"


BOMBS = [(levels, fanout, mapping) for levels in (7, 9, 12) for fanout in (6, 9) for mapping in (False, True)]


@pytest.mark.parametrize(("levels", "fanout", "mapping"), BOMBS)
def test_alias_bombs_fail_fast_with_a_clear_error(levels, fanout, mapping):
    text = _alias_bomb(levels, fanout, mapping)
    assert len(text) < 1500 and fanout**levels > 10 * config_guard.MAX_CONFIG_NODES
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to more than .* YAML nodes"):
        load_config(text)
    assert time.perf_counter() - start < 1.0


def test_alias_bomb_through_the_cli_fails_fast(tmp_path, capsys):
    (tmp_path / "bomb.yaml").write_text(_alias_bomb(9, 9, False))
    assert (tmp_path / "bomb.yaml").stat().st_size < 500
    start = time.perf_counter()
    code, err = _run_main(["fit", "--config", str(tmp_path / "bomb.yaml")], capsys)
    elapsed = time.perf_counter() - start
    assert code == 2 and "expands to more than" in err, err[-2000:]
    assert elapsed < 10  # parser construction included; the bound itself is measured above (< 1 s)
    inline = "[" + ", ".join(["&a [x, x, x, x, x, x, x, x]"] + ["&b [" + ", ".join(["*a"] * 9) + "]"]) + "]"
    code, err = _run_main(["fit", "--config", str(tmp_path / "bomb.yaml"), "--trainer.callbacks", inline], capsys)
    assert code == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: &a [*a]", "recursive YAML alias"),
        ("a: " + "[" * 200 + "]" * 200, "nests deeper than"),
        ("a: " + "{b: " * 100 + "1" + "}" * 100, "nests deeper than"),
        ("a: '" + "x" * (config_guard.MAX_CONFIG_BYTES + 1) + "'", "bytes; the limit is"),
        ("a: [" + ", ".join(["1"] * (config_guard.MAX_CONFIG_NODES + 1)) + "]", "expands to more than"),
    ],
    ids=["recursive", "deep-list", "deep-map", "oversize", "too-many-nodes"],
)
def test_yaml_bounds(text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(text)


def test_ordinary_yaml_with_aliases_still_loads():
    text = "base: &b {lr: 0.01}\nmodel: {lr: 0.02}\nother: *b\n"
    assert load_config(text)["other"] == {"lr": 0.01}
    for path in Path(__file__).parents[1].joinpath("configs").rglob("*.yaml"):
        load_config(path.read_text())  # every shipped config is far inside the bounds
