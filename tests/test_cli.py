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
