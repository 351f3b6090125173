"""A whole deployment on one machine's loopback, every component a real process started with the
`fedseek deploy …` commands the docker-compose services run: SuperLink (TLS + SuperNode auth;
`fleet` is its published Fleet-only address, `superlink` the operator's control address),
the ServerApp SuperExec, a Ray head, and per institution a SuperNode (its own key, TLS to the
SuperLink and to its ClientApp process) plus its ClientApp SuperExec. Used by the deployment
tests and `bench/deployment.py`; the caller owns the MLflow server and platform DB (env)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_demo_sites(root: Path, names: tuple[str, ...], rows: int, task: str = "banking77") -> dict[str, Path]:
    """One CSV per institution (`text,label`) from the task's shipped partition (IID, seed 0),
    at most `rows` records each: what an institution's `--data` file looks like."""
    import csv

    from fedseek.data.tasks import load_federated_data

    data = load_federated_data(task, institutions=len(names), seed=0)
    files = {}
    for name, part in zip(names, data.train):
        files[name] = Path(root) / f"{name}.csv"
        with files[name].open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            for text, label in list(zip(part.texts, part.labels))[:rows]:
                writer.writerow([text, data.label_names[label]])
    return files


def deploy_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedseek", "deploy", *args]


class LocalFederation:
    """Start with `start(sites)`, always `stop()` (also removes the Ray head's advertisement)."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root = Path(root)
        self.link_port, self.control_port, self.ray_port = free_port(), free_port(), free_port()
        self.fleet = f"127.0.0.1:{self.link_port}"  # the published port: Fleet API only (institutions)
        self.superlink = f"127.0.0.1:{self.control_port}"  # the operator's control listener (Control + Runtime)
        self.env = {**env, "FLWR_HOME": str(self.root / "flwr"), "RAY_ADDRESS": "",
                    "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}
        self.processes: list[subprocess.Popen] = []
        self.named: dict[str, tuple[list[str], subprocess.Popen]] = {}  # name -> (command, process)

    # -- processes ----------------------------------------------------------------------------
    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(deploy_command(*args), env=self.env, cwd=self.root, capture_output=True,
                              text=True, timeout=timeout)

    def spawn(self, name: str, command: list[str], append_log: bool = False) -> subprocess.Popen:
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        with (self.root / "logs" / f"{name}.log").open("a" if append_log else "w") as log:
            proc = subprocess.Popen(command, env=self.env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.processes.append(proc)
        self.named[name] = (command, proc)
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL a component's whole process group (a crashed machine: no clean shutdown)."""
        _, proc = self.named[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def restart(self, name: str, timeout: float = 300, settle: float = 15) -> subprocess.Popen:
        """Start a killed component again with the same command, retrying while it exits at once, as
        the compose restart policy does (a SuperLink refuses a node's key while it still counts the
        crashed node as online: until its heartbeat expires). Returns the process that stayed up."""
        command, _ = self.named[name]
        deadline = time.monotonic() + timeout
        while True:
            proc = self.spawn(name, command, append_log=True)
            try:
                proc.wait(timeout=settle)
            except subprocess.TimeoutExpired:
                return proc
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not stay up within {timeout:.0f}s: {self.log(name)[-2000:]}")
            time.sleep(5)

    def pause(self, name: str, paused: bool = True) -> None:
        """SIGSTOP / SIGCONT a component's process group: a machine that hangs without failing."""
        os.killpg(self.named[name][1].pid, signal.SIGSTOP if paused else signal.SIGCONT)

    def log(self, name: str) -> str:
        return (self.root / "logs" / f"{name}.log").read_text()

    def wait_port(self, port: int, proc: subprocess.Popen, name: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}): {self.log(name)[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"{name}: port {port} not open after {timeout:.0f}s: {self.log(name)[-2000:]}")

    def _check(self, result: subprocess.CompletedProcess, what: str) -> None:
        if result.returncode:
            raise RuntimeError(f"{what} failed: {(result.stdout + result.stderr)[-2000:]}")

    # -- the federation -----------------------------------------------------------------------
    def start_superlink(self, key_names: tuple[str, ...] = ()) -> None:
        """Certificates, a key pair per name (not registered) and the SuperLink (published Fleet
        listener `fleet`, operator's control listener `superlink`)."""
        self._check(self.run("certs", "--out", "certs", "--host", "localhost", "--host", "127.0.0.1"), "certs")
        for name in key_names:
            self._check(self.run("keys", "--out", "keys", "--institution", name), f"keys {name}")
        link = self.spawn("superlink", deploy_command("superlink", "--certs", "certs", "--state", "state",
                                                      "--host", "127.0.0.1", "--port", str(self.link_port),
                                                      "--control-host", "127.0.0.1",
                                                      "--control-port", str(self.control_port)))
        self.wait_port(self.link_port, link, "superlink")
        self.wait_port(self.control_port, link, "superlink")

    def register(self, name: str) -> None:
        """The operator admits `name` (`fedseek deploy register` on the control listener)."""
        self._check(self.run("register", "--superlink", self.superlink, "--ca", "certs/ca.crt",
                             "--institution", name, "--public-key", f"keys/{name}.pub"), f"register {name}")

    def start_supernode(self, name: str, data: Path, ray: bool = True) -> int:
        """The institution's SuperNode, dialling the published Fleet address; its Runtime API port."""
        port = free_port()
        command = deploy_command("supernode", "--superlink", self.fleet, "--ca", "certs/ca.crt", "--key",
                                 f"keys/{name}.key", "--institution", name, "--data", str(data), "--port", str(port))
        if ray:
            self._check(self.run("certs", "--out", f"site-{name}", "--host", "127.0.0.1"), f"site certs {name}")
            command += ["--ray-address", f"127.0.0.1:{self.ray_port}", "--num-cpus", "1", "--local-certs", f"site-{name}"]
        node = self.spawn(f"supernode-{name}", command)
        self.wait_port(port, node, f"supernode-{name}")
        return port

    def start(self, sites: dict[str, Path], ray_cpus: int = 3, extra_keys: tuple[str, ...] = ()) -> None:
        """Certificates, keys (also for `extra_keys`, never registered), SuperLink, ServerApp
        SuperExec, Ray head, registration and one SuperNode + ClientApp SuperExec per site."""
        self.start_superlink((*sites, *extra_keys))
        self.spawn("serverapp", deploy_command("serverapp", "--superlink", self.superlink, "--ca", "certs/ca.crt",
                                               "--secret", "certs/superexec.secret"))
        ray_head = self.spawn("ray", [str(BIN / "ray"), "start", "--head", "--block", "--port", str(self.ray_port),
                                      "--node-ip-address", "127.0.0.1", "--num-cpus", str(ray_cpus),
                                      "--num-gpus", "0", "--include-dashboard", "false", "--disable-usage-stats"])
        self.wait_port(self.ray_port, ray_head, "ray")
        for name in sites:
            self.register(name)
        for name, data in sites.items():
            port = self.start_supernode(name, data)
            self.spawn(f"clientapp-{name}", deploy_command("clientapp", "--supernode", f"127.0.0.1:{port}",
                                                           "--local-certs", f"site-{name}"))

    def stop(self) -> None:
        for proc in reversed(self.processes):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGCONT)  # a paused one could not act on SIGTERM
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.processes):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        advertised = Path("/tmp/ray/ray_current_cluster")  # `ray start` advertises its head here
        if advertised.is_file() and advertised.read_text().strip().endswith(f":{self.ray_port}"):
            advertised.unlink()
