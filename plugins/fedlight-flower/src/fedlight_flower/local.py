"""A whole Flower deployment on this machine: one SuperLink, N SuperNodes and ``flwr run``, as processes.

Each process starts in its own session (process group) and :meth:`LocalDeployment.close` ends every
group with SIGTERM, then SIGKILL after ``grace`` seconds, so nothing outlives the run (Flower's
SuperLink/SuperNode start ``flower-superexec`` and ``flwr-serverapp``/``flwr-clientapp`` children).
Everything binds to 127.0.0.1. With ``tls`` (what ``fedlight flower local`` passes unless ``--insecure``)
the SuperLink serves HTTPS with the deployment's certificate and SuperNode authentication, each
SuperNode's key is registered with ``flwr supernode register`` before it starts, and ``flwr run`` checks
the SuperLink's certificate against the deployment's CA: exactly the multi-machine setup.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import fedlight_flower
from fedlight_flower.cli import CONNECTION

if TYPE_CHECKING:
    from fedlight_flower.tls import TlsFiles


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with code {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


class LocalDeployment:
    """``with LocalDeployment(app_dir, num_nodes, workdir) as d: d.run()`` -> exit code of ``flwr run``."""

    def __init__(
        self,
        app_dir: str | Path,
        num_nodes: int,
        workdir: str | Path,
        host: str = "127.0.0.1",
        grace: float = 5.0,
        tls: TlsFiles | None = None,
    ):
        self.app_dir = Path(app_dir)
        self.num_nodes = num_nodes
        self.workdir = Path(workdir)
        self.host = host
        self.grace = grace
        self.tls = tls
        self.port = free_port(host)
        self.node_ports = [free_port(host) for _ in range(num_nodes)]
        self.procs: list[subprocess.Popen] = []
        self.flwr_home = self.workdir / "flwr-home"
        self.env = fedlight_flower.apply_quiet_env(dict(os.environ))
        self.env["FLWR_HOME"] = str(self.flwr_home)  # FABs, the CLI connection: nothing in ~/.flwr
        # Flower's console scripts (and the flwr-serverapp/flwr-clientapp processes they start) from this
        # environment, even when it is not activated
        self.env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), self.env.get("PATH", "")])

    def _spawn(self, argv: list[str], log: str) -> subprocess.Popen:
        out = (self.workdir / log).open("w")
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self, timeout: float = 60) -> LocalDeployment:
        from fedlight_flower.cli import flwr_config_toml, superlink_commands

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(exist_ok=True)
        ca = self.tls.ca_cert if self.tls else None
        (self.flwr_home / "config.toml").write_text(flwr_config_toml(self.host, self.port, CONNECTION, ca))
        commands = superlink_commands(self.host, self.num_nodes, self.port, bind=self.host, tls=self.tls)
        link = self._spawn(commands["superlink"], "superlink.log")
        wait_for_port(self.host, self.port, timeout, link)
        if self.tls:  # SuperNode authentication: only registered keys may connect
            for k in range(self.num_nodes):
                self.register(commands["register"](k), timeout)
        for k, node_port in enumerate(self.node_ports):
            self._spawn(commands["supernode"](k, node_port), f"supernode-{k}.log")
        return self

    def register(self, argv: list[str], timeout: float = 60) -> None:
        """Run ``flwr supernode register ...`` against the SuperLink (log: ``register.log``); raise if it fails."""
        with (self.workdir / "register.log").open("a") as log:
            done = subprocess.run(
                argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, timeout=timeout, check=False
            )
        code = done.returncode
        if code != 0:
            raise RuntimeError(f"{' '.join(argv)} failed (exit {code}); see {self.workdir / 'register.log'}")

    def run(self, timeout: float = 600) -> int:
        """``flwr run <app> fedlight-local --stream``; its log is ``flwr-run.log``."""
        with (self.workdir / "flwr-run.log").open("w") as log:
            proc = subprocess.Popen(
                ["flwr", "run", str(self.app_dir), CONNECTION, "--stream"],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
            )  # fmt: skip
            self.procs.append(proc)
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return -1

    def close(self) -> None:
        """SIGTERM every process group, SIGKILL what is left after ``grace`` seconds; bounded time."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = [p for p in self.procs if p.poll() is None]
            for proc in alive:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + self.grace
            for proc in alive:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        for proc in self.procs:  # the groups' other members (superexec, clientapp) got the same signals
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def __enter__(self) -> LocalDeployment:  # noqa: PYI034 (typing.Self needs Python 3.11)
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.workdir.glob("*.log")))
