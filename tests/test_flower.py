"""fedlight on Flower (plugins/fedlight-flower): same result as `fedlight fit`, and a real local deployment.

Skipped where flwr or the plugin is not installed; CI installs both (``.ci/run``, ``tox.ini``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

flwr = pytest.importorskip("flwr")
pytest.importorskip("fedlight_flower")

import torch  # noqa: E402
from conftest import round_callback, run_fit, vision_config  # noqa: E402

from fedlight.errors import ConfigError  # noqa: E402


def flower_config(tmp_path: Path, **overrides) -> dict:
    """Tiny ViT on digits, bias-only tuning with a *local* head (so Context.state carries per-client tensors)."""
    base = {
        "model": {"peft": {"class_path": "bitfit", "init_args": {"head": "local"}}},
        "data": {"num_clients": 3},
        "federation": {"rounds": 2, "clients_per_round": 2, "local_steps": 2, "checkpoint_every": 0},
    }
    cfg = vision_config(tmp_path, **base)
    from conftest import merge

    return merge(cfg, overrides)


def write(cfg: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def in_process_state(cfg: dict, tmp_path: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """`fedlight fit` in this process with one intra-op thread, as each Flower client actor runs (Ray
    sets OMP_NUM_THREADS=1), so the float reductions are the same and the states are bit-identical."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fed = round_callback(run_fit(cfg, tmp_path))
    finally:
        torch.set_num_threads(threads)
    return fed.global_state, fed.history


def test_flower_simulation_equals_in_process(tmp_path):
    """Same seed, same sampled clients: the Simulation Runtime's final trainable state == `fedlight fit`'s."""
    from fedlight_flower.cli import simulate

    cfg = flower_config(tmp_path)
    expected, history = in_process_state(cfg, tmp_path / "inproc")
    out = tmp_path / "sim"
    got = simulate(write(cfg, tmp_path / "flower.yaml"), out, cpus_per_client=1, num_cpus=1)
    assert list(got) == list(expected)
    for name in expected:
        torch.testing.assert_close(got[name].float(), expected[name].float(), rtol=0, atol=1e-6)
    rows = yaml.safe_load((out / "rounds.json").read_text())
    assert [r["round"] for r in rows] == [0, 1, 2]
    for ours, theirs in zip(rows, history):  # same per-round validation and byte counts
        assert ours["num_clients"] == theirs["num_clients"]
        assert ours["uplink_bytes"] == theirs["uplink_bytes"]
        assert ours["val_acc"] == pytest.approx(theirs["val_acc"], abs=1e-6)
    from safetensors.torch import load_file

    saved = load_file(str(out / "global_state.safetensors"))
    assert all(torch.equal(saved[k], got[k]) for k in got)
    assert (out / "rounds.csv").read_text().startswith("round,num_clients,rejected,dropped,failed,uplink_bytes")


class InMemoryGrid:
    """A Flower ``Grid`` that delivers each message to a ClientApp in this process, one ``Context`` per node
    (Flower's node state), so the message protocol runs without Ray or a SuperLink."""

    def __init__(self, client_app, num_nodes: int, run_config: dict) -> None:
        from flwr.app import Context, RecordDict

        self.app = client_app
        self.contexts = {
            1000 + k: Context(1, 1000 + k, {"partition-id": k, "num-partitions": num_nodes}, RecordDict(), run_config)
            for k in range(num_nodes)
        }
        self.sent: list[str] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg.metadata.message_type)
            replies.append(self.app(msg, self.contexts[msg.metadata.dst_node_id]))
        return replies


def test_protocol_with_codec_error_feedback_privacy_and_dropouts_matches_in_process(tmp_path, monkeypatch):
    """The ServerApp/ClientApp protocol (Context.state residuals, codec payload bytes, privacy state to the
    clients, dropouts) gives `fedlight fit`'s exact result; the client side is a separate job instance."""
    from fedlight_flower import apps
    from fedlight_flower.job import FedlightJob

    cfg = flower_config(
        tmp_path,
        data={"num_clients": 4},
        federation={
            "rounds": 3, "clients_per_round": 3, "local_steps": 1,
            "uplink_codec": {"class_path": "int8", "init_args": {"error_feedback": True}},
            "aggregator": {"class_path": "fedavg", "init_args": {"weighting": "uniform"}},
            "privacy": {"class_path": "dp_fedavg", "init_args": {"noise_multiplier": 0.5, "clip_norm": 0.5, "adaptive_clipping": True, "clipped_count_stddev": 1.0}},
            "faults": {"dropout_before": 0.2, "dropout_after": 0.2},
        },
    )  # fmt: skip
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # what a ServerApp process has; Message() reads it
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)
    fed = round_callback(run_fit(cfg, tmp_path / "inproc"))
    config = write(cfg, tmp_path / "flower.yaml")
    server_job = FedlightJob(config)
    grid = InMemoryGrid(apps.build_client_app(str(config)), 4, {})
    got = apps.run_server(grid, server_job, tmp_path / "out", round_timeout=60, nodes_timeout=5)
    assert apps.get_job(str(config)) is not server_job  # clients did not share the server's objects
    for name, value in fed.global_state.items():
        assert torch.equal(got[name], value), name
    residuals = [c.state.array_records.get("fedlight.state.residual") for c in grid.contexts.values()]
    assert any(r is not None for r in residuals)  # error feedback lives in Flower's node state
    assert grid.sent.count("query") == 4
    rows = yaml.safe_load((tmp_path / "out" / "rounds.json").read_text())
    for ours, theirs in zip(rows, fed.history):
        for key in ("num_clients", "uplink_bytes", "val_acc"):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-9), key
        if ours["round"] > 0:
            assert ours["dropped"] == theirs["dropped"]
            assert ours["epsilon"] == pytest.approx(theirs["epsilon"])
    assert sum(r.get("dropped", 0) for r in rows) > 0  # the faults really fired


def test_unsupported_federation_options_fail_before_training(tmp_path):
    from fedlight_flower.job import FedlightJob

    cfg = flower_config(tmp_path, federation={"export_every": 1})
    with pytest.raises(ConfigError, match="federation.export_every is not supported by fedlight-flower"):
        FedlightJob(write(cfg, tmp_path / "bad.yaml"))
    cfg = flower_config(tmp_path, federation={"attack": {"class_path": "sign_flip"}, "malicious_fraction": 0.34})
    with pytest.raises(ConfigError, match="federation.attack is not supported"):
        FedlightJob(write(cfg, tmp_path / "bad2.yaml"))


def test_quiet_offline_environment():
    import fedlight_flower

    env = fedlight_flower.apply_quiet_env({"FLWR_TELEMETRY_ENABLED": "1"})
    assert env["FLWR_TELEMETRY_ENABLED"] == "1"  # an explicit user value wins
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"  # set on import


def test_fedlight_plugins_lists_the_package(monkeypatch, capsys):
    from fedlight.cli import main, print_plugin_packages

    monkeypatch.delenv("FEDLIGHT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    print_plugin_packages()
    assert "fedlight-flower" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # the engine switch: `fedlight flower ...` is fedlight-flower
        main(["flower", "--help"])
    assert exit_info.value.code == 0
    assert "fedlight-flower simulate --config" in capsys.readouterr().out


def test_deploy_writes_a_flower_app(tmp_path):
    import tomllib

    from fedlight_flower.cli import deploy, main

    config = write(flower_config(tmp_path), tmp_path / "job.yaml")
    app = deploy(config, tmp_path / "app", superlink="10.0.0.5", port=9000)
    project = tomllib.loads((app / "pyproject.toml").read_text())
    assert project["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "fedlight_flower.apps:server_app",
        "clientapp": "fedlight_flower.apps:client_app",
    }
    assert project["tool"]["flwr"]["app"]["config"]["config"] == str(config.resolve())
    readme = (app / "README.md").read_text()
    assert "flower-superlink --insecure --disable-runtime-dependency-installation --host 0.0.0.0 --port 9000" in readme
    assert "--superlink 10.0.0.5:9000" in readme and 'partition-id=$K num-partitions=3' in readme
    assert "--ssl-certfile" in readme and "--root-certificates" in readme
    connection = tomllib.loads((app / "flwr-home" / "config.toml").read_text())
    assert connection["superlink"]["fedlight-local"] == {"address": "10.0.0.5:9000", "insecure": True}
    assert main(["deploy", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "x")]) == 2


def live_members(groups: set[int]) -> list[int]:
    """Processes (not zombies: a container's init may not reap them) whose process group is in ``groups``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) in groups:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_local_deployment_superlink_and_supernodes(tmp_path):
    """A SuperLink and 2 SuperNodes as local processes (insecure, free ports), one round through `flwr run`,
    then every process group is gone within a bounded time."""
    from safetensors.torch import load_file

    from fedlight_flower.cli import deploy
    from fedlight_flower.local import LocalDeployment

    cfg = flower_config(
        tmp_path, data={"num_clients": 2}, federation={"rounds": 1, "clients_per_round": 1, "eval_before_training": False}
    )
    config = write(cfg, tmp_path / "job.yaml")
    app = deploy(config, tmp_path / "app", results=tmp_path / "results")
    deployment = LocalDeployment(app, 2, tmp_path / "logs", grace=3)
    deployment.env["OMP_NUM_THREADS"] = "1"  # the same float reductions as in_process_state: bit-identical
    try:
        deployment.start()
        code = deployment.run(timeout=240)
        assert code == 0, deployment.logs()
    finally:
        t0 = time.monotonic()
        deployment.close()
        closed_in = time.monotonic() - t0
    assert closed_in < 15
    groups = {proc.pid for proc in deployment.procs}
    assert all(proc.poll() is not None for proc in deployment.procs)
    assert not live_members(groups), "processes outlived the deployment"
    got = load_file(str(tmp_path / "results" / "global_state.safetensors"))
    expected, _ = in_process_state(cfg, tmp_path / "inproc")
    assert sorted(got) == sorted(expected)  # safetensors files list names sorted
    for name in expected:
        torch.testing.assert_close(got[name].float(), expected[name].float(), rtol=0, atol=1e-6)
    rows = yaml.safe_load((tmp_path / "results" / "rounds.json").read_text())
    assert [r["round"] for r in rows] == [1] and rows[0]["num_clients"] == 1
