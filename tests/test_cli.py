"""The command line: short names, early clear errors, --print_config, plugins listing, third-party YAML."""

from __future__ import annotations

import pytest
import yaml
from conftest import read_rounds, round_callback, run_fit, text_config

from fedlight.cli import main


def _write(cfg, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_plugins_command_lists_every_kind(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for header in ("tasks:", "peft_methods:", "aggregators:", "codecs:", "partitioners:", "privacy:", "datasets:", "attacks:"):
        assert header in out
    assert "lora" in out and "[fedlight]" in out


def test_unknown_plugin_name_fails_before_training_listing_choices(tiny_bert_dir, tmp_path, capsys):
    cfg = text_config(tiny_bert_dir, tmp_path, model={"peft": {"class_path": "loraa"}})
    assert main(["fit", "--config", _write(cfg, tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "model.peft" in err and "'loraa'" in err and "lora" in err.split("available:")[1]
    assert not (tmp_path / "runs").exists()  # nothing started


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"federation": {"clients_per_round": 9}}, "clients_per_round (9) exceeds data.num_clients (4)"),
        ({"federation": {"local_steps": 0}}, "federation.local_steps must be >= 1"),
        ({"federation": {"local_epochs": 1.0}}, "exactly one of federation.local_steps and federation.local_epochs"),
        ({"model": {"lr": -1.0}}, "model.lr must be > 0"),
        ({"data": {"partitioner": {"class_path": "dirichlet", "init_args": {"alpha": 0}}}}, "alpha must be > 0"),
        ({"model": {"task": {"class_path": "text_classification", "init_args": {"model_name_or_path": "/nope/model"}}}},
         "does not exist"),
        ({"model": {"task": {"class_path": "image_classification", "init_args": {"model": "resnet_bogus"}}}},
         "unknown timm model"),
    ],
)  # fmt: skip
def test_bad_config_fails_before_round_one_naming_the_field(tiny_bert_dir, tmp_path, override, message):
    cfg = text_config(tiny_bert_dir, tmp_path, **override)
    with pytest.raises((ValueError, FileNotFoundError, SystemExit)) as err:
        run_fit(cfg, tmp_path)
    text = str(err.value) if not isinstance(err.value, SystemExit) else str(err.value.__context__)
    assert message in text
    assert not list((tmp_path / "runs").rglob("rounds.csv"))


def test_print_config_resolves_short_names(tiny_bert_dir, tmp_path, capsys):
    cfg = text_config(tiny_bert_dir, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", _write(cfg, tmp_path), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["peft"]["class_path"] == "fedlight.peft.lora.LoRA"
    assert printed["federation"]["rounds"] == 2


def test_third_party_plugin_runs_from_yaml(tiny_bert_dir, tmp_path, registry_with_entry_points):
    from test_plugins import _example_installed

    _example_installed()
    cfg = text_config(
        tiny_bert_dir, tmp_path, federation={"aggregator": {"class_path": "server_lr_fedavg", "init_args": {"server_lr": 0.5}}}
    )
    fed = round_callback(run_fit(cfg, tmp_path))
    assert type(fed.aggregator).__module__ == "fedlight_example.plugin"
    assert fed.aggregator.server_lr == 0.5
    assert len(read_rounds(tmp_path)) == 3


def test_partitions_command_prints_per_client_histograms(tiny_bert_dir, tmp_path, capsys):
    cfg = text_config(tiny_bert_dir, tmp_path)
    plot = tmp_path / "parts.png"
    assert main(["partitions", "--config", _write(cfg, tmp_path), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "english" in out and "spanish" in out and "label skew" in out
    assert plot.read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------ plugin short names on the command line

SHORT_NAMES = [
    (["--federation.aggregator", "fedadam"], "federation.aggregator", "FedAdam"),
    (["--federation.aggregator=fedadam"], "federation.aggregator", "FedAdam"),
    (["--model.peft", "bitfit"], "model.peft", "BitFit"),
    (["--model.peft.class_path", "bitfit"], "model.peft", "BitFit"),
    (["--model.peft", '{"class_path": "lora", "init_args": {"r": 3}}'], "model.peft", "LoRA"),
    (["--federation.uplink_codec", "int8"], "federation.uplink_codec", "Int8Codec"),
    (["--federation.uplink_codec=compress", "--federation.uplink_codec.init_args.inner=int8"], "federation.uplink_codec.init_args.inner", "Int8Codec"),
    (["--data.partitioner", "iid"], "data.partitioner", "IID"),
]  # fmt: skip


def _class_name(cli, dotted: str) -> str:
    """The built object's class for model/data options; the parsed class_path for federation ones."""
    section, *rest = dotted.split(".")
    if section == "federation":
        return cli.config[dotted]["class_path"].rsplit(".", 1)[-1]
    obj = {"model": cli.model, "data": cli.datamodule}[section]
    for name in rest:
        obj = getattr(obj, name)
    return type(obj).__name__


@pytest.mark.parametrize(("args", "where", "cls"), SHORT_NAMES, ids=[" ".join(a)[:40] for a, _, _ in SHORT_NAMES])
def test_plugin_short_names_work_on_the_command_line(args, where, cls, tmp_path):
    from conftest import vision_config

    from fedlight.cli import run_cli

    path = _write(vision_config(tmp_path), tmp_path)
    cli = run_cli(["--config", path, "--trainer.logger", "false", *args], run=False)
    assert _class_name(cli, where) == cls
    if '"r": 3' in args[-1]:
        assert cli.model.peft.r == 3


PLUGIN_OPTIONS = [
    ("model.peft", "peft_methods"),
    ("model.task", "tasks"),
    ("federation.aggregator", "aggregators"),
    ("federation.uplink_codec", "codecs"),
    ("federation.privacy", "privacy"),
    ("federation.attack", "attacks"),
    ("data.partitioner", "partitioners"),
    ("data.dataset", "datasets"),
]


def _typos(names: list[str], rng) -> list[str]:
    """Seeded one-edit typos (drop, double, swap a character) that are not registered names."""
    out = []
    while len(out) < 2:
        name = rng.choice(names)
        i = rng.randrange(len(name) - 1)
        typo = rng.choice([name[:i] + name[i + 1 :], name[:i] + name[i] + name[i:], name[:i] + name[i + 1] + name[i] + name[i + 2 :]])
        if typo not in names and typo not in out and typo.isidentifier():
            out.append(typo)
    return out


@pytest.mark.parametrize(("option", "kind"), PLUGIN_OPTIONS)
def test_plugin_typos_fail_the_same_way_on_the_command_line_and_in_yaml(option, kind, tmp_path, capsys):
    import random

    from conftest import merge, vision_config

    from fedlight.plugins import get_registry

    names = get_registry().names(kind)
    for typo in _typos(names, random.Random(f"{option}")):
        section, key = option.split(".")
        base = vision_config(tmp_path)
        assert main(["fit", "--config", _write(base, tmp_path), f"--{option}", typo]) == 2
        cli_err = capsys.readouterr().err
        assert main(["fit", "--config", _write(merge(base, {section: {key: typo}}), tmp_path)]) == 2
        yaml_err = capsys.readouterr().err
        expected = f"fedlight: error: {option}: unknown {kind[:-1].replace('_', ' ')} '{typo}'; available: {', '.join(names)}"
        assert expected in cli_err and expected in yaml_err, (cli_err[-500:], yaml_err[-500:])


# ------------------------------------------------------------------ command-line messages say what to change

CLI_MESSAGES = [
    (["--trainer.max_epochs", "5"], "trainer.max_epochs is set by fedlight from federation.rounds"),
    (["--trainer.max_epochs=5"], "set federation.rounds instead"),
    (["--federation.round", "3"], "unknown config key 'federation.round'; did you mean federation.rounds"),
    (["--model.pef", "lora"], "unknown config key 'model.pef'; did you mean model.peft"),
    (["--model.peft.init_args.rr", "2"], "model.peft.init_args.rr: LoRA has no argument 'rr'; did you mean r?"),
    (["--federation.faults", '{"dropout_before": -0.1}'], "federation.faults.dropout_before must be in [0, 1), got -0.1"),
    (["--trainer.callbacks+=fedlight.cli.os.system"], "import path 'posix.system' is not allowed"),
]


@pytest.mark.parametrize(("args", "message"), CLI_MESSAGES, ids=[a[0] for a, _ in CLI_MESSAGES])
def test_command_line_mistakes_say_what_to_change(args, message, tmp_path, capsys):
    from conftest import vision_config

    assert main(["fit", "--config", _write(vision_config(tmp_path), tmp_path), "--trainer.logger", "false", *args]) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()), err[-2000:]
    assert "Does not validate against any of the Union subtypes" not in err and "Traceback" not in err
    assert "usage:" not in err  # one line that says what to change, not the whole usage text
    assert not list(tmp_path.rglob("rounds.csv"))
