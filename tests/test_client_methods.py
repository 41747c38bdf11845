"""Client methods (FedProx, SCAFFOLD): contract over the registry, the maths by hand, and real runs."""

from __future__ import annotations

import inspect

import pytest
import torch
import yaml

from conftest import round_callback, run_fit, vision_config
from fedlight.client_methods.base import ClientMethod
from fedlight.client_methods.fedprox import FedProx
from fedlight.client_methods.scaffold import Scaffold
from fedlight.plugins import build_registry

REGISTRY = build_registry(autoload=False)
METHODS = [REGISTRY.get("client_methods", n).cls for n in REGISTRY.names("client_methods")]


# --- contract, generated from the registry ----------------------------------------------------


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.name)
def test_contract(cls):
    assert issubclass(cls, ClientMethod) and cls.name and cls.summary() != "(no description)"
    for param in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        assert param.annotation is not inspect.Parameter.empty, f"{cls.name}.{param.name} is untyped"
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    names = [n for n, _ in model.named_parameters()]
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = cls(**cls.example_args)
    method.bind(names, num_clients=3)
    received = method.broadcast(start)
    store: dict = {}
    method.start_client(0, start, received, store)
    model(torch.randn(4, 3)).pow(2).sum().backward()
    params = dict(model.named_parameters())
    method.correct_gradients(params, lr=0.1)
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    extra = method.finish_client(0, start, trained, store)
    assert set(extra) <= set(names)
    assert bool(extra) == cls.sends_extra
    method.server_update([(0, extra)] if extra else [])
    # state round-trips into a fresh instance
    fresh = cls(**cls.example_args)
    fresh.bind(names, num_clients=3)
    fresh.load_state_dict(method.state_dict())
    for key, value in method.state_dict().items():
        got = fresh.state_dict()[key]
        if isinstance(value, dict):
            assert all(torch.equal(value[n], got[n]) for n in value)
        else:
            assert value == got


def test_fedprox_rejects_negative_mu():
    with pytest.raises(ValueError, match="mu"):
        FedProx(mu=-0.1)


# --- the maths, by hand ------------------------------------------------------------------------


def test_fedprox_gradient_is_the_proximal_terms_gradient():
    torch.manual_seed(0)
    mu = 0.7
    model = torch.nn.Linear(4, 3)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():  # move away from the anchor so the term is non-zero
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))

    # autograd of loss + mu/2 ||w - w0||^2
    model.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    prox = sum((p - anchor[n]).pow(2).sum() for n, p in model.named_parameters())
    (loss + mu / 2 * prox).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}

    # the plugin: task-loss gradient, then the correction
    method = FedProx(mu=mu)
    method.bind(list(anchor), num_clients=1)
    method.start_client(0, anchor, {}, {})
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    method.correct_gradients(dict(model.named_parameters()), lr=0.1)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n])
        torch.testing.assert_close(p.grad, raw[n] + mu * (p.detach() - anchor[n]))
        assert not torch.allclose(p.grad, raw[n])


def test_scaffold_control_update_by_hand():
    """K SGD steps with g − c_i + c; option II gives c_i⁺ = c_i − c + (x − y)/(Kη) = mean of the raw gradients."""
    torch.manual_seed(0)
    K, lr, N = 4, 0.05, 5
    model = torch.nn.Linear(3, 1)
    names = [n for n, _ in model.named_parameters()]
    x = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = Scaffold()
    method.bind(names, num_clients=N)
    assert all(torch.equal(v, torch.zeros_like(v)) for v in method.broadcast(x).values())
    method.control = {n: torch.randn_like(x[n]) for n in names}  # a server control from earlier rounds
    c_i = {n: torch.randn_like(x[n]) for n in names}
    store = {"control": dict(c_i)}
    received = method.broadcast(x)
    c = {n: method.control[n].clone() for n in names}
    method.start_client(2, x, received, store)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    raw_grads = []
    w = {n: x[n].clone() for n in names}  # the same trajectory computed by hand
    for step in range(K):
        data, target = torch.randn(6, 3), torch.randn(6, 1)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(data), target).backward()
        raw = {n: p.grad.clone() for n, p in model.named_parameters()}
        raw_grads.append(raw)
        method.correct_gradients(dict(model.named_parameters()), lr=lr)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, raw[n] - c_i[n] + c[n])
            w[n] = w[n] - lr * (raw[n] - c_i[n] + c[n])
        optimizer.step()
    y = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n in names:
        torch.testing.assert_close(y[n], w[n])
    delta = method.finish_client(2, x, y, store)
    for n in names:
        new = c_i[n] - c[n] + (x[n] - y[n]) / (K * lr)
        torch.testing.assert_close(store["control"][n], new)
        torch.testing.assert_close(store["control"][n], sum(g[n] for g in raw_grads) / K, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(delta[n], new - c_i[n])
    other = {n: torch.randn_like(x[n]) for n in names}
    method.server_update([(2, delta), (4, other)])
    for n in names:
        torch.testing.assert_close(method.control[n], c[n] + (delta[n] + other[n]) / N)


# --- real runs ---------------------------------------------------------------------------------


def _fed(tmp_path, **federation):
    base = {"rounds": 2, "clients_per_round": 2, "local_steps": 3, "checkpoint_every": 0, **federation}
    cfg = vision_config(tmp_path, federation=base)
    cfg["data"]["partitioner"] = {"class_path": "shards", "init_args": {"classes_per_client": 3}}
    return cfg


def test_fedprox_with_mu_zero_is_fedavg_bit_for_bit(tmp_path):
    fedavg = round_callback(run_fit(_fed(tmp_path / "a"), tmp_path / "a"))
    plain = fedavg.global_state
    prox0 = round_callback(run_fit(_fed(tmp_path / "b", client_method={"class_path": "fedprox", "init_args": {"mu": 0.0}}), tmp_path / "b"))
    assert list(plain) == list(prox0.global_state)
    for name in plain:
        assert torch.equal(plain[name], prox0.global_state[name]), name
    prox = round_callback(run_fit(_fed(tmp_path / "c", client_method={"class_path": "fedprox", "init_args": {"mu": 5.0}}), tmp_path / "c"))
    assert any(not torch.equal(plain[n], prox.global_state[n]) for n in plain), "mu had no effect"
    for a, b in zip(fedavg.history, prox.history, strict=True):  # nothing extra travels
        assert (a["uplink_bytes"], a["downlink_bytes"]) == (b["uplink_bytes"], b["downlink_bytes"])


def test_scaffold_run_counts_control_bytes_keeps_the_invariant_and_resumes_identically(tmp_path):
    federation = {"rounds": 3, "client_method": "scaffold", "checkpoint_every": 1}
    cfg = _fed(tmp_path / "full", **federation)
    cfg["data"]["num_clients"] = 5
    cfg["trainer"]["logger"]["init_args"]["version"] = 0
    cfg["optimizer"] = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}}  # what SCAFFOLD assumes
    cli = run_fit(cfg, tmp_path / "full")
    fed = round_callback(cli)
    (optimizer,) = cli.trainer.optimizers  # the top-level optimizer section, over the trainable tensors only
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 0.05
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(cli.model.peft.trainable_names(cli.model.model))
    method = fed.client_method
    model_bytes = len(fed.client.uplink.encode(fed.global_state))
    control_bytes = len(fed.client.uplink.encode(method.control))
    for row in fed.history[1:]:  # c down and Δc up with every client, counted
        assert row["uplink_bytes"] == row["num_clients"] * (model_bytes + control_bytes)
        assert row["downlink_bytes"] == row["num_clients"] * (model_bytes + control_bytes)
    # with every update accepted, c = (1/N) Σ_i c_i over all N clients (never-sampled ones hold 0)
    controls = [s["control"] for s in fed.client_store.values()]
    assert 2 <= len(controls) <= 5
    for n in method.control:
        torch.testing.assert_close(method.control[n], sum(c[n] for c in controls) / 5, rtol=1e-5, atol=1e-7)
        assert method.control[n].abs().sum() > 0

    (ckpt,) = list((tmp_path / "full").rglob("round-0001.ckpt"))
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    path = resumed_dir / "cfg.yaml"
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(resumed_dir / "runs")
    path.write_text(yaml.safe_dump(cfg))
    from fedlight.cli import run_cli

    again = round_callback(run_cli(["fit", "--config", str(path), "--ckpt_path", str(ckpt)]))
    for name in fed.global_state:
        assert torch.equal(fed.global_state[name], again.global_state[name]), name
    for name in method.control:
        assert torch.equal(method.control[name], again.client_method.control[name]), name
    assert sorted(fed.client_store) == sorted(again.client_store)
    for client, state in fed.client_store.items():
        for name, value in state["control"].items():
            assert torch.equal(value, again.client_store[client]["control"][name]), (client, name)


def test_scaffold_with_privacy_is_refused_before_training():
    from fedlight.core.round import FederatedRound
    from fedlight.privacy.local_dp import LocalDP

    with pytest.raises(ValueError, match="scaffold.*does not protect"):
        FederatedRound(client_method=Scaffold(), privacy=LocalDP())
    FederatedRound(client_method=FedProx(), privacy=LocalDP())  # FedProx sends nothing extra


def test_scaffold_with_per_client_views_is_refused():
    from fedlight.aggregators.fedavg import FedAvg
    from fedlight.core.round import FederatedRound

    class RankViews(FedAvg):  # like hetlora / flexlora: each client trains a restricted view
        name = "rank_views"

        def client_view(self, global_state, client_id):
            return global_state

    with pytest.raises(ValueError, match="restricted view"):
        FederatedRound(client_method=Scaffold(), aggregator=RankViews())
    FederatedRound(client_method=FedProx(), aggregator=RankViews())
    FederatedRound(client_method=Scaffold(), aggregator=FedAvg())
