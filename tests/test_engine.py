"""The round engine: Lightning-free, shared by every engine, and behaviour-preserving."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import build_cli, round_callback, run_fit, vision_config
from torch.utils.data import DataLoader

FIXTURES = Path(__file__).parent / "fixtures"

#: the run that wrote tests/fixtures/pre_engine_round-0001.ckpt with the callback of before the engine
#: redesign (commit 24bd5cf): SCAFFOLD (client controls, server control) + int8 with error feedback
PRE_ENGINE = {
    "federation": {
        "rounds": 2, "clients_per_round": 2, "local_steps": 2, "checkpoint_every": 1, "client_method": "scaffold",
        "uplink_codec": {"class_path": "int8", "init_args": {"error_feedback": True}},
    },
    "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}},
}  # fmt: skip


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_written_before_the_engine_redesign_resumes_bit_identically(tmp_path):
    # the fixture was written with one intra-op thread; round 1 is reproduced bit for bit only with the same
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _resume_pre_engine_fixture(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _resume_pre_engine_fixture(tmp_path):
    full = round_callback(run_fit(vision_config(tmp_path / "full", **PRE_ENGINE), tmp_path / "full"))
    from fedlight.cli import run_cli

    cfg = vision_config(tmp_path / "resumed", **PRE_ENGINE)
    import yaml

    path = tmp_path / "resumed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    resumed = round_callback(run_cli(["fit", "--config", str(path), "--ckpt_path", str(FIXTURES / "pre_engine_round-0001.ckpt")]))
    assert [r["round"] for r in resumed.history] == [0, 1, 2]
    assert _same(resumed.global_state, full.global_state)
    assert _same(resumed.client_store[next(iter(full.client_store))]["control"], full.client_store[next(iter(full.client_store))]["control"])
    assert resumed.history[-1]["uplink_bytes"] == full.history[-1]["uplink_bytes"]


@pytest.mark.parametrize(
    "federation",
    [
        {},
        {"client_method": "scaffold", "uplink_codec": {"class_path": "int8", "init_args": {"error_feedback": True}}},
        {"attack": "sign_flip", "malicious_fraction": 0.25, "aggregator": "median", "clients_per_round": 3},
    ],
    ids=["fedavg", "scaffold+int8ef", "attack+median"],
)
def test_engine_driven_without_lightning_equals_fedlight_fit(tmp_path, federation):
    """The engine API plus ``core.local.train_client`` (what Flower runs) == the Lightning callback, bit for bit."""
    from fedlight.core.datamodule import ClientTaggedDataset, RoundBatchSampler, collate_with_client
    from fedlight.core.engine import Population
    from fedlight.core.local import train_client
    from fedlight.core.plan import RoundPlan

    over = {"federation": {"rounds": 2, "clients_per_round": 2, "local_steps": 2, "checkpoint_every": 0, **federation}}
    if "client_method" in federation:
        over["optimizer"] = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}}
    fit = round_callback(run_fit(vision_config(tmp_path / "fit", **over), tmp_path / "fit"))

    (tmp_path / "manual").mkdir()
    cli = build_cli(vision_config(tmp_path / "manual", **over), tmp_path / "manual")
    module, dm = cli.model, cli.datamodule
    engine = round_callback(cli).engine
    dm.setup("fit")
    module.build(dm.num_classes)
    engine.bind(Population(tuple(dm.client_sizes), dm.batch_size), dm)
    engine.attach(module)
    data = ClientTaggedDataset(dm.splits.train)
    for round_idx in (1, 2):
        plan = engine.begin_round(round_idx).plan
        for client, steps in zip(plan.training, plan.steps, strict=True):
            one = RoundPlan(round_idx, (client,), (client,), (steps,))
            sampler = RoundBatchSampler(one, dm.client_indices, dm.batch_size, dm.seed or 0)
            batches = DataLoader(data, batch_sampler=sampler, collate_fn=partial(collate_with_client, module.task.collate))
            train_client(engine, client, batches, lambda: cli.model.configure_optimizers())
        engine.end_round()
        engine.round_row({})
    assert _same(engine.global_state, fit.global_state)
    for key in ("uplink_bytes", "downlink_bytes", "num_clients", "rejected"):
        assert [r[key] for r in engine.history] == [r[key] for r in fit.history[1:]]


def test_a_feature_from_the_config_runs_at_its_points_and_is_checkpointed(tmp_path):
    """A round feature is one class: listed in ``federation.features`` it adds a rounds.csv column and its state."""
    from fedlight.features.update_norms import UpdateNorms

    cfg = vision_config(tmp_path, federation={"rounds": 2, "checkpoint_every": 1, "features": [{"class_path": "update_norms"}]})
    cli = run_fit(cfg, tmp_path)
    fed = round_callback(cli)
    feature = next(f for f in fed.engine.features if isinstance(f, UpdateNorms))
    rows = [r for r in fed.history if r["round"] > 0]
    assert all(r["update_norm_max"] >= r["update_norm_mean"] > 0 for r in rows)
    assert feature.state_dict()["rounds_seen"] == 2
    ckpt = torch.load(next((tmp_path / "runs").rglob("last.ckpt")), weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if "FederatedRound" in k]
    assert state["update_norms"]["rounds_seen"] == 2


def test_every_rounds_csv_column_reaches_a_real_tensorboard_logger(tmp_path):
    """TensorBoard shows accuracy vs round and vs kB sent, bytes and epsilon; read back from the event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(tmp_path / "tb"), "name": "t"}}
    privacy = {"class_path": "dp_fedavg", "init_args": {"noise_multiplier": 1.0, "clip_norm": 0.5}}
    cfg = vision_config(
        tmp_path,
        trainer={"logger": logger},
        federation={"rounds": 2, "checkpoint_every": 0, "privacy": privacy,
                    "aggregator": {"class_path": "fedavg", "init_args": {"weighting": "uniform"}}},
    )  # fmt: skip
    fed = round_callback(run_fit(cfg, tmp_path))
    (events,) = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for column in ("val_acc", "uplink_bytes", "downlink_bytes", "cumulative_mb", "epsilon", "num_clients", "rejected"):
        assert f"round/{column}" in tags, column
    val = acc.Scalars("round/val_acc")
    assert [e.step for e in val] == [0, 1, 2]
    assert [round(e.value, 6) for e in val] == [round(r["val_acc"], 6) for r in fed.history]
    eps = acc.Scalars("round/epsilon")
    assert eps[-1].value == pytest.approx(fed.history[-1]["epsilon"], rel=1e-6)
    by_kb = acc.Scalars("round_by_kb/val_acc")
    assert [e.step for e in by_kb] == [int(round(r["cumulative_mb"] * 1000)) for r in fed.history]


def test_runs_print_no_lightning_tips_or_args_warning(tmp_path, capsys, caplog):
    import logging
    import warnings

    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_fit(vision_config(tmp_path, federation={"rounds": 1, "checkpoint_every": 0}), tmp_path)
    text = capsys.readouterr().out + capsys.readouterr().err + caplog.text
    assert "Tip:" not in text
    assert not [w for w in caught if "args parameter" in str(w.message)]


def test_optimizer_and_scheduler_sections_build_over_the_trainable_tensors(tmp_path):
    """The top-level optimizer:/lr_scheduler: sections reach the module through public LightningCLI links."""
    cfg = vision_config(
        tmp_path,
        optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}},
        lr_scheduler={"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1, "gamma": 0.5}},
        federation={"rounds": 2, "checkpoint_every": 0},
    )
    cli = run_fit(cfg, tmp_path)
    (optimizer,) = cli.trainer.optimizers
    assert type(optimizer).__name__ == "SGD"
    trainable = {id(p) for p in cli.model.model.parameters() if p.requires_grad}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable
    (config,) = cli.trainer.lr_scheduler_configs
    assert type(config.scheduler).__name__ == "StepLR" and optimizer.param_groups[0]["lr"] == 0.1 * 0.5**2
