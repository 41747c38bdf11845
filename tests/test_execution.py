"""``federation.execution``: steps, sequential and grouped clients give the same round results.

``sequential`` runs each client's local steps inside one Lightning step (core.local); ``grouped``
stacks the round's clients and trains them in one vectorised step per local step (core.grouped).
Both must equal ``steps`` (every local step a Lightning step) to float tolerance, for every method and
feature grouping supports, and fall back (with a notice) where it cannot stack.
"""

from __future__ import annotations

import pytest
import torch
from conftest import read_rounds, round_callback, run_fit, text_config, vision_config
from test_faults import crashing_registry  # noqa: F401 - the fixture, shared

from fedlight.errors import ConfigError

#: grouped execution reorders float sums inside batched kernels: with SGD the states agree to this
#: after a few steps of a tiny model (sequential == steps bit for bit). Adam divides by sqrt(v), which
#: turns the rounding of near-zero gradients into steps of up to lr, so AdamW runs get ADAM_ATOL.
ATOL = 2e-5
ADAM_ATOL = 1e-3
SGD = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}

BASE = {"rounds": 2, "clients_per_round": 3, "local_steps": 3}


def _runs(tmp_path, make_cfg, executions=("steps", "sequential", "grouped")):
    out = {}
    for execution in executions:
        cfg = make_cfg(tmp_path / execution)
        cfg.setdefault("optimizer", SGD)
        cfg["federation"]["execution"] = execution
        out[execution] = round_callback(run_fit(cfg, tmp_path / execution))
    return out


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert list(a) == list(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _assert_equal_runs(runs, atol=ATOL):
    ref = runs["steps"]
    for execution, fed in runs.items():
        assert [r["num_clients"] for r in fed.history] == [r["num_clients"] for r in ref.history]
        assert [r["uplink_bytes"] for r in fed.history] == [r["uplink_bytes"] for r in ref.history]
        assert _max_diff(fed.global_state, ref.global_state) <= (0.0 if execution == "sequential" else atol), execution
        losses = [r["train_loss"] for r in fed.history[1:]]
        assert losses == pytest.approx([r["train_loss"] for r in ref.history[1:]], abs=1e-5)
    # the update moved the model: equality of three unchanged states would prove nothing
    assert _max_diff(ref.global_state, ref.engine.initial_state) > 1e-4


@pytest.fixture(autouse=True)
def _initial_state(monkeypatch):
    """Keep each run's initial global state on its callback (what the runs' states are compared against)."""
    from fedlight.core.engine import RoundEngine

    attach = RoundEngine.attach

    def keep(self, module):
        attach(self, module)
        self.initial_state = {k: v.clone() for k, v in self.global_state.items()}

    monkeypatch.setattr(RoundEngine, "attach", keep)


PEFT = {
    "lora": {"class_path": "lora", "init_args": {"r": 2}},
    "vpt": {"class_path": "vpt", "init_args": {"num_tokens": 2}},
    "adapter": {"class_path": "adapter", "init_args": {"reduction": 8}},
    "full": {"class_path": "full"},
    # the head trains in every method above; these add nothing new to stack (slow: CI only)
    "head": pytest.param({"class_path": "head"}, marks=pytest.mark.slow),
    "bitfit": pytest.param({"class_path": "bitfit"}, marks=pytest.mark.slow),
    "adaptformer": pytest.param({"class_path": "adaptformer", "init_args": {"reduction": 8}}, marks=pytest.mark.slow),
}


@pytest.mark.parametrize("method", list(PEFT.values()), ids=list(PEFT))
def test_every_vision_peft_method_trains_the_same_in_every_execution(tmp_path, method):
    federation = {**BASE, "rounds": 1}  # one round: every client's stacked training, then the aggregate
    runs = _runs(
        tmp_path, lambda d: vision_config(d, model={"peft": method}, federation=federation), ("steps", "grouped")
    )
    assert runs["grouped"].executor.grouped is not None, runs["grouped"].executor.notice
    _assert_equal_runs(runs)


FEATURES = {
    "int8 + error feedback, label_flip attackers (batches), compute tiers (masked steps), dropouts": {
        "uplink_codec": {"class_path": "int8", "init_args": {"error_feedback": True}},
        "attack": "label_flip", "malicious_fraction": 0.25,
        "compute_tiers": {"fractions": [1.0, 0.34]}, "faults": {"dropout_after": 0.3}, "clients_per_round": 4,
    },
    "dp_fedavg": {
        "privacy": {"class_path": "dp_fedavg", "init_args": {"noise_multiplier": 0.5, "clip_norm": 0.5}},
        "aggregator": {"class_path": "fedavg", "init_args": {"weighting": "uniform"}},
    },
    "alie (colluding attackers) against the median": {
        "attack": "alie", "malicious_fraction": 0.25, "clients_per_round": 4, "aggregator": "median",
    },
    "secure aggregation": pytest.param(
        {"secure_aggregation": {"threshold": 0.5}, "aggregator": {"class_path": "fedavg", "init_args": {"weighting": "uniform"}}},
        marks=pytest.mark.slow,
    ),
    "fedex_lora (merges into the frozen base)": pytest.param({"aggregator": "fedex_lora"}, marks=pytest.mark.slow),
    "hetlora (per-client rank views)": pytest.param(
        {"aggregator": {"class_path": "hetlora", "init_args": {"rank_tiers": [1, 2]}}}, marks=pytest.mark.slow
    ),
    "personalised evaluation, local heads": pytest.param({"personal_eval_every": 1}, marks=pytest.mark.slow),
}  # fmt: skip


@pytest.mark.parametrize("feature", list(FEATURES.values()), ids=list(FEATURES))
def test_features_give_the_same_round_in_every_execution(tmp_path, feature):
    federation = {**BASE, **feature}
    model = (
        {"peft": {"class_path": "lora", "init_args": {"r": 2, "head": "local"}}}
        if "personal_eval_every" in feature
        else {}
    )
    runs = _runs(tmp_path, lambda d: vision_config(d, federation=federation, model=model), ("steps", "grouped"))
    assert runs["grouped"].executor.grouped is not None, runs["grouped"].executor.notice
    _assert_equal_runs(runs)


def test_local_tensors_stay_with_each_client_whichever_execution_trains_it(tmp_path):
    peft = {"class_path": "fedsa_lora", "init_args": {"r": 2}}  # B stays on each client
    runs = _runs(
        tmp_path,
        lambda d: vision_config(d, model={"peft": peft}, federation={**BASE, "rounds": 3}),
        ("steps", "grouped"),
    )
    ref = runs["steps"].client_store
    for execution in ("grouped",):
        store = runs[execution].client_store
        assert sorted(store) == sorted(ref)
        for client in ref:
            assert _max_diff(store[client]["local"], ref[client]["local"]) <= ATOL
    _assert_equal_runs(runs)


def test_gradient_clipping_and_sgd_momentum_are_per_client_when_grouped(tmp_path):
    def cfg(d):
        c = vision_config(
            d,
            federation=dict(BASE),
            optimizer={"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1, "momentum": 0.9}},
        )
        c["trainer"]["gradient_clip_val"] = 0.05  # small: every client's step is clipped
        return c

    _assert_equal_runs(_runs(tmp_path, cfg))


@pytest.fixture(scope="module")
def deterministic_bert_dir(tiny_bert_dir, tmp_path_factory):
    """The tiny BERT without dropout: grouped draws its dropout masks per slot, not in sequence."""
    import json
    import shutil

    out = tmp_path_factory.mktemp("bert-no-dropout")
    shutil.copytree(tiny_bert_dir, out, dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_text_batches_of_different_padded_lengths_are_grouped_in_buckets(deterministic_bert_dir, tmp_path):
    federation = {**BASE, "clients_per_round": 4, "rounds": 1}
    make = lambda d: text_config(deterministic_bert_dir, d, federation=federation)  # noqa: E731
    runs = _runs(tmp_path, make, ("steps", "grouped"))
    assert runs["grouped"].executor.grouped is not None
    _assert_equal_runs(runs, atol=5e-5)


def test_clients_with_fewer_examples_than_a_batch_share_one_padded_bucket(tmp_path, monkeypatch):
    """Non-IID clients with a few examples (batch = their whole data) are padded into the step's one
    bucket, not vmapped one size at a time; the round still equals steps."""
    from fedlight.core import grouped

    calls: list[list[int]] = []  # per vmapped bucket: its batch sizes (after padding)
    step = grouped.GroupedTrainer._bucket_step

    def spy(self, bucket, batches, *args):
        calls.append([len(b["labels"]) for b in batches])
        return step(self, bucket, batches, *args)

    monkeypatch.setattr(grouped.GroupedTrainer, "_bucket_step", spy)
    data = {
        "num_clients": 300,
        "batch_size": 8,
        "partitioner": {"class_path": "dirichlet", "init_args": {"alpha": 0.5, "min_size": 1}},
    }
    federation = {**BASE, "clients_per_round": 8, "rounds": 2}
    make = lambda d: vision_config(d, data=data, federation=federation)  # noqa: E731
    runs = _runs(tmp_path, make, ("steps", "grouped"))
    _assert_equal_runs(runs)
    assert calls and all(len(set(c)) == 1 for c in calls)  # every bucket one batch size
    # some planned clients had fewer than 8 examples: without padding their steps would be buckets of their own
    fed = runs["grouped"]
    sizes = {fed.engine.population.client_sizes[c] for r in (1, 2) for c in fed.plan_for(r).training}
    assert min(sizes) < 8 <= max(sizes), sizes  # clients with fewer examples than a batch, and with more
    assert len(calls) == 2 * BASE["local_steps"]  # one bucket per local step of each round's one group


@pytest.mark.parametrize("seed", range(12))
def test_padding_a_batch_with_ignored_labels_leaves_loss_and_gradients_unchanged(seed):
    """Generated batches: padded to a larger size with -100 labels, F.cross_entropy's loss and gradients are
    those of the batch itself; soft (float) labels and tensors without the example dimension are not padded."""
    from fedlight.core.grouped import _pad, _row_signature

    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 8, (1,), generator=g))
    size = n + int(torch.randint(0, 9, (1,), generator=g))
    batch = {"images": torch.randn(n, 5, generator=g), "labels": torch.randint(0, 3, (n,), generator=g),
             "client_id": torch.full((n,), seed)}  # fmt: skip
    weight = torch.randn(5, 3, generator=g, requires_grad=True)

    def loss_grad(b):
        loss = torch.nn.functional.cross_entropy(b["images"] @ weight, b["labels"])
        return loss, torch.autograd.grad(loss, weight)[0]

    padded = _pad(batch, size, ("labels",))
    assert len(padded["images"]) == size and (padded["labels"][n:] == -100).all()
    (loss, grad), (loss_p, grad_p) = loss_grad(batch), loss_grad(padded)
    assert torch.allclose(loss, loss_p, atol=1e-6) and torch.allclose(grad, grad_p, atol=1e-6)
    assert _row_signature(batch, ("labels",)) == _row_signature(padded, ("labels",))
    assert _row_signature({**batch, "labels": batch["labels"].float()}, ("labels",)) is None
    assert _row_signature({**batch, "scale": torch.tensor(1.0)}, ("labels",)) is None
    assert _row_signature(batch, ()) is None


def test_grouped_resumes_from_a_round_checkpoint_like_an_uninterrupted_run(tmp_path):
    from fedlight.cli import run_cli

    federation = {**BASE, "rounds": 3, "execution": "grouped", "checkpoint_every": 1}
    full = round_callback(run_fit(vision_config(tmp_path / "full", federation=federation), tmp_path / "full"))
    first = vision_config(tmp_path / "part", federation={**federation, "rounds": 1})
    first["trainer"]["max_epochs"] = 1
    run_fit(first, tmp_path / "part")
    (ckpt,) = (tmp_path / "part").rglob("round-0001.ckpt")
    import yaml

    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(vision_config(tmp_path / "resumed", federation=federation)))
    resumed = round_callback(run_cli(["fit", "--config", str(path), "--ckpt_path", str(ckpt)]))
    assert [r["round"] for r in resumed.history] == [0, 1, 2, 3]
    assert _max_diff(resumed.global_state, full.global_state) <= ATOL


@pytest.mark.usefixtures("crashing_registry")
@pytest.mark.parametrize("execution", ["sequential", "grouped"])
def test_a_client_that_raises_is_isolated_in_every_execution(tiny_bert_dir, tmp_path, execution):
    task = {"class_path": "crashing_text_classification", "init_args": {"model_name_or_path": str(tiny_bert_dir)}}
    federation = {"clients_per_round": 4, "rounds": 1, "execution": execution}
    cfg = text_config(tiny_bert_dir, tmp_path, model={"task": task}, federation=federation)
    with pytest.warns(UserWarning, match="client 1 raised"):
        fed = round_callback(run_fit(cfg, tmp_path))
    row = fed.history[-1]
    assert row["failed"] == 1 and row["num_clients"] == 3
    assert int(read_rounds(tmp_path)[-1]["failed"]) == 1


FALLBACKS = {
    "scaffold keeps each client's controls between steps": ({"client_method": "scaffold"}, None, "client_method"),
    "dp_sgd acts per example": (
        {"privacy": {"class_path": "dp_sgd", "init_args": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}}, None, "per example"
    ),
    "lbfgs-like optimizers are not elementwise": (
        {}, {"class_path": "torch.optim.Rprop", "init_args": {"lr": 0.01}}, "not one of the elementwise"
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_what_cannot_be_stacked_runs_sequentially_with_a_notice_and_the_same_result(tmp_path, case):
    extra, optimizer, reason = FALLBACKS[case]

    def cfg(d):
        c = vision_config(d, federation={**BASE, **extra, "rounds": 1})
        if optimizer:
            c["optimizer"] = optimizer
        return c

    runs = _runs(tmp_path, cfg, ("steps", "grouped"))
    executor = runs["grouped"].executor
    assert executor.grouped is None and executor.execution == "sequential"
    assert reason in executor.notice
    assert _max_diff(runs["grouped"].global_state, runs["steps"].global_state) == 0.0


BAD = [
    (
        {"execution": "parallel"},
        """Parser key "federation.execution":\n  Expected a typing.Literal['steps', 'sequential', 'grouped']""",
    ),
    ({"execution": "grouped", "group_size": 0}, "federation.group_size must be 'auto' or an integer >= 1, got 0"),
    ({"execution": "grouped", "group_size": -3}, "federation.group_size must be 'auto' or an integer >= 1, got -3"),
    ({"execution": "grouped", "group_size": "all"}, 'Parser key "federation.group_size"'),
]


@pytest.mark.parametrize(("federation", "match"), BAD)
def test_bad_execution_settings_fail_before_round_1(tmp_path, federation, match):
    cfg = vision_config(tmp_path, federation={**BASE, **federation})
    with pytest.raises((ConfigError, ValueError)) as err:
        run_fit(cfg, tmp_path)
    assert match in str(err.value)
    assert not list((tmp_path / "runs").rglob("rounds.csv"))  # nothing ran


@pytest.mark.parametrize("precision", ["16-mixed", "16"])
def test_fp16_loss_scaling_needs_lightning_steps(precision):
    # Lightning turns 16-mixed into bf16-mixed on CPU, so the rule is checked on the trainer's values
    from types import SimpleNamespace

    from fedlight.core.executors import check_trainer

    trainer = SimpleNamespace(precision=precision, lr_scheduler_configs=[])
    check_trainer("steps", trainer)
    for execution in ("sequential", "grouped"):
        with pytest.raises(ValueError, match="loss scaling, which trainer.precision 16-mixed needs"):
            check_trainer(execution, trainer)
    check_trainer("grouped", SimpleNamespace(precision="bf16-mixed", lr_scheduler_configs=[]))


def test_a_step_interval_scheduler_is_refused_outside_steps_execution(tmp_path, monkeypatch):
    from fedlight.core.module import FederatedModule

    def per_step(self):  # a module whose scheduler steps every optimizer step
        optimizer = self.make_optimizer([p for p in self.net.parameters() if p.requires_grad])
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    monkeypatch.setattr(FederatedModule, "configure_optimizers", per_step)
    cfg = vision_config(tmp_path, federation={**BASE, "execution": "sequential"})
    with pytest.raises(ConfigError, match="interval 'step'"):
        run_fit(cfg, tmp_path)


def test_an_epoch_scheduler_moves_the_learning_rate_per_round_in_every_execution(tmp_path):
    def cfg(d):
        c = vision_config(d, federation=dict(BASE))
        c["lr_scheduler"] = {
            "class_path": "torch.optim.lr_scheduler.StepLR",
            "init_args": {"step_size": 1, "gamma": 0.5},
        }
        return c

    _assert_equal_runs(_runs(tmp_path, cfg))
