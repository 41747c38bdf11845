"""A table of bad configs: each fails before round 1 with a message naming what to change."""

from __future__ import annotations

import pytest
import yaml
from conftest import text_config, vision_config

from fedlight.cli import main

T = "text"
V = "vision"
CASES = [
    # (id, base, overrides, expected substring)
    ("unknown-peft", T, {"model": {"peft": {"class_path": "loraa"}}}, "model.peft: unknown peft method 'loraa'"),
    ("unknown-aggregator", T, {"federation": {"aggregator": "fedavgx"}}, "federation.aggregator: unknown aggregator"),
    ("unknown-codec", T, {"federation": {"uplink_codec": "int3"}}, "federation.uplink_codec: unknown codec"),
    ("unknown-dataset", T, {"data": {"dataset": "imagenet"}}, "data.dataset: unknown dataset"),
    ("unknown-partitioner", T, {"data": {"partitioner": "zipf"}}, "data.partitioner: unknown partitioner"),
    ("unknown-task", T, {"model": {"task": {"class_path": "segmentation"}}}, "model.task: unknown task"),
    ("unsafe-class-path", T, {"trainer": {"callbacks": [{"class_path": "os.system"}]}}, "import path 'os.system' is not allowed"),
    ("reexported-class-path", T, {"trainer": {"callbacks": [{"class_path": "fedlight.cli.os.system"}]}}, "import path 'posix.system' is not allowed"),
    ("max-epochs", T, {"trainer": {"max_epochs": 5}}, "trainer.max_epochs is set by fedlight from federation.rounds"),
    ("typo-key", T, {"federation": {"round": 3}}, "unknown config key 'federation.round'; did you mean federation.rounds"),
    ("typo-init-arg", T, {"model": {"peft": {"class_path": "lora", "init_args": {"rr": 2}}}}, "model.peft.init_args.rr: LoRA has no argument 'rr'; did you mean r?"),
    ("compute-tiers-fraction", T, {"federation": {"compute_tiers": {"fractions": [2.0]}}}, "federation.compute_tiers.fractions must be in (0, 1]"),
    ("model-package-not-a-distribution", T, {"model": {"task": {"class_path": "text_classification", "init_args": {"model_name_or_path": "package:antigravity"}}}}, "model package 'antigravity' is not installed"),
    ("wrong-type-rounds", T, {"federation": {"rounds": "ten"}}, "federation.rounds"),
    ("zero-rounds", T, {"federation": {"rounds": 0}}, "federation.rounds must be >= 1"),
    ("too-many-clients-per-round", T, {"federation": {"clients_per_round": 9}}, "clients_per_round (9) exceeds data.num_clients (4)"),
    ("steps-and-epochs", T, {"federation": {"local_epochs": 2.0}}, "exactly one of federation.local_steps and federation.local_epochs"),
    ("negative-dropout", T, {"federation": {"faults": {"dropout_before": -0.1}}}, "federation.faults.dropout_before must be in [0, 1)"),
    ("min-clients", T, {"federation": {"faults": {"min_clients": 3}}}, "federation.faults.min_clients (3) exceeds"),
    ("negative-norm-bound", T, {"federation": {"max_update_norm": -1.0}}, "federation.max_update_norm must be > 0"),
    ("negative-checkpoint-every", T, {"federation": {"checkpoint_every": -1}}, "federation.checkpoint_every must be >= 0"),
    ("zero-lr", T, {"model": {"lr": 0.0}}, "model.lr must be > 0"),
    ("zero-clients", T, {"data": {"num_clients": 0}}, "data.num_clients must be >= 1"),
    ("zero-batch", T, {"data": {"batch_size": 0}}, "data.batch_size"),
    ("more-clients-than-examples", T, {"data": {"num_clients": 100000}, "federation": {"clients_per_round": 2}}, "exceeds the number of training examples"),
    ("dirichlet-alpha", T, {"data": {"partitioner": {"class_path": "dirichlet", "init_args": {"alpha": -1}}}}, "dirichlet alpha must be > 0"),
    ("lora-rank", T, {"model": {"peft": {"class_path": "lora", "init_args": {"r": 0}}}}, "lora r must be >= 1"),
    ("lora-dropout", T, {"model": {"peft": {"class_path": "lora", "init_args": {"dropout": 1.5}}}}, "lora dropout must be in [0, 1)"),
    ("lora-target", T, {"model": {"peft": {"class_path": "lora", "init_args": {"target": "everything"}}}}, "unknown target preset 'everything'"),
    ("head-only-frozen", T, {"model": {"peft": {"class_path": "head", "init_args": {"head": "frozen"}}}}, "head='frozen' would train nothing"),
    ("missing-model-path", T, {"model": {"task": {"class_path": "text_classification", "init_args": {"model_name_or_path": "/no/such/dir"}}}}, "/no/such/dir' does not exist"),
    ("missing-model-package", T, {"model": {"task": {"class_path": "text_classification", "init_args": {"model_name_or_path": "package:no_such_pkg"}}}}, "model package 'no_such_pkg' is not installed"),
    ("unknown-language", T, {"data": {"dataset": {"class_path": "chatterbot", "init_args": {"languages": ["klingon"]}}}}, "unknown languages ['klingon']"),
    ("val-fraction", T, {"data": {"dataset": {"class_path": "chatterbot", "init_args": {"val_fraction": 1.5}}}}, "val_fraction must be in (0, 1)"),
    ("unknown-timm-model", V, {"model": {"task": {"class_path": "image_classification", "init_args": {"model": "resnet_bogus"}}}}, "unknown timm model 'resnet_bogus'"),
    ("missing-checkpoint", V, {"model": {"task": {"class_path": "image_classification", "init_args": {"model": "resnet10t", "checkpoint_path": "/no/w.safetensors"}}}}, "model.task.init_args.checkpoint_path '/no/w.safetensors' does not exist"),
    ("accumulate-grad", T, {"trainer": {"accumulate_grad_batches": 2}}, "trainer.accumulate_grad_batches must be 1"),
    ("limit-train-batches", T, {"trainer": {"limit_train_batches": 0.5}}, "trainer.limit_train_batches would cut rounds short"),
]  # fmt: skip


@pytest.mark.parametrize(("base", "overrides", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_fails_early_naming_the_field(base, overrides, expected, tiny_bert_dir, tmp_path, capsys):
    cfg = text_config(tiny_bert_dir, tmp_path, **overrides) if base == T else vision_config(tmp_path, **overrides)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    try:
        code = main(["fit", "--config", str(path)])
    except SystemExit as exit_:  # jsonargparse's own type errors exit from the parser
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert expected in " ".join(err.split()), err[-2000:]
    assert "Does not validate against any of the Union subtypes" not in err, "the plugin's own message is buried"
    assert not list(tmp_path.rglob("rounds.csv")), "training started"
    assert not list(tmp_path.rglob("*.ckpt"))


def test_the_table_is_large_enough():
    assert len(CASES) >= 20
