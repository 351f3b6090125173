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


def write_demo_sites(root: Path, names: tuple[str, ...], rows: int, task: str = "banking77",
                     as_job: bool = False) -> dict[str, Path]:
    """One CSV per institution (`text,label`) from the task's shipped partition (IID, seed 0),
    at most `rows` records each: what an institution's `--data` file looks like. `as_job`: the
    records a job with `data.max_train_rows = rows × institutions` gives each institution (an
    untracked job's census checks the counts against the coordinator's own split)."""
    import csv

    from fedseek.data.tasks import load_federated_data

    data = load_federated_data(task, institutions=len(names), seed=0,
                               max_train_rows=rows * len(names) if as_job else None)
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
        # RAY_worker_niceness: Ray starts its workers at nice 15 by default, so a site's training
        # yields the CPU to every other process of the machine; the site worker is the work here
        self.env = {**env, "FLWR_HOME": str(self.root / "flwr"), "RAY_ADDRESS": "",
                    "RAY_worker_niceness": env.get("RAY_worker_niceness", "0"),
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
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # already gone
            pass
        proc.wait()

    def restart(self, name: str, timeout: float = 300, ready: str = "SuperNode ID: ") -> subprocess.Popen:
        """Start a killed component again with the same command, retrying while it exits, as the
        compose restart policy does (a SuperLink refuses a node's key while it still counts the
        crashed node as online: until its heartbeat expires). Returns the process once its log
        says `ready` (a SuperNode: connected); a refused one that is slow to exit on a loaded
        machine is not mistaken for one that stayed up."""
        command, _ = self.named[name]
        deadline = time.monotonic() + timeout
        while True:
            seen = len(self.log(name))
            proc = self.spawn(name, command, append_log=True)
            while proc.poll() is None:
                if ready in self.log(name)[seen:]:
                    return proc
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not come back within {timeout:.0f}s: {self.log(name)[-2000:]}")
            time.sleep(2)

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

    def _run_together(self, commands: dict[str, tuple[str, ...]]) -> None:
        """One-shot `fedseek deploy` commands (certs, keys) side by side; each must succeed."""
        procs = {what: subprocess.Popen(deploy_command(*args), env=self.env, cwd=self.root, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for what, args in commands.items()}
        for what, proc in procs.items():
            output, _ = proc.communicate(timeout=300)
            if proc.returncode:
                raise RuntimeError(f"{what} failed: {output[-2000:]}")

    # -- the federation -----------------------------------------------------------------------
    def start_superlink(self, key_names: tuple[str, ...] = (), site_certs: tuple[str, ...] = (),
                        wait: bool = True) -> subprocess.Popen:
        """Certificates, a key pair per name (not registered), the site certificates of `site_certs`
        (all made side by side) and the SuperLink (published Fleet listener `fleet`, operator's
        control listener `superlink`); `wait`: until both listeners accept connections."""
        commands = {"certs": ("certs", "--out", "certs", "--host", "localhost", "--host", "127.0.0.1")}
        commands |= {f"keys {name}": ("keys", "--out", "keys", "--institution", name) for name in key_names}
        commands |= {f"site certs {name}": ("certs", "--out", f"site-{name}", "--host", "127.0.0.1")
                     for name in site_certs}
        self._run_together(commands)
        link = self.spawn("superlink", deploy_command("superlink", "--certs", "certs", "--state", "state",
                                                      "--host", "127.0.0.1", "--port", str(self.link_port),
                                                      "--control-host", "127.0.0.1",
                                                      "--control-port", str(self.control_port)))
        if wait:
            self.wait_superlink()
        return link

    def wait_superlink(self) -> None:
        for port in (self.link_port, self.control_port):
            self.wait_port(port, self.named["superlink"][1], "superlink")

    def register(self, *names: str) -> None:
        """The operator admits `names` (`fedseek deploy register` on the control listener): the
        first alone (it may create the platform DB's schema), the others side by side."""
        command = lambda name: ("register", "--superlink", self.superlink, "--ca", "certs/ca.crt",  # noqa: E731
                                "--institution", name, "--public-key", f"keys/{name}.pub")
        if names:
            self._run_together({f"register {names[0]}": command(names[0])})
            self._run_together({f"register {name}": command(name) for name in names[1:]})

    def start_supernode(self, name: str, data: Path, ray: bool = True, wait: bool = True) -> int:
        """The institution's SuperNode, dialling the published Fleet address; its Runtime API port
        (`wait`: once it accepts connections)."""
        port = free_port()
        command = deploy_command("supernode", "--superlink", self.fleet, "--ca", "certs/ca.crt", "--key",
                                 f"keys/{name}.key", "--institution", name, "--data", str(data), "--port", str(port))
        if ray:
            if not (self.root / f"site-{name}" / "ca.crt").is_file():
                self._check(self.run("certs", "--out", f"site-{name}", "--host", "127.0.0.1"), f"site certs {name}")
            command += ["--ray-address", f"127.0.0.1:{self.ray_port}", "--num-cpus", "1", "--local-certs", f"site-{name}"]
        node = self.spawn(f"supernode-{name}", command)
        if wait:
            self.wait_port(port, node, f"supernode-{name}")
        return port

    def start(self, sites: dict[str, Path], ray_cpus: int = 3, extra_keys: tuple[str, ...] = ()) -> None:
        """Certificates, keys (also for `extra_keys`, never registered), SuperLink, ServerApp
        SuperExec, Ray head, registration and one SuperNode + ClientApp SuperExec per site.
        Independent steps overlap (the SuperLink and the Ray head start together, the SuperNodes
        too); so do the registrations after the first."""
        self.start_superlink((*sites, *extra_keys), tuple(sites), wait=False)
        ray_head = self.spawn("ray", [str(BIN / "ray"), "start", "--head", "--block", "--port", str(self.ray_port),
                                      "--node-ip-address", "127.0.0.1", "--num-cpus", str(ray_cpus),
                                      "--num-gpus", "0", "--include-dashboard", "false", "--disable-usage-stats"])
        self.wait_superlink()
        self.spawn("serverapp", deploy_command("serverapp", "--superlink", self.superlink, "--ca", "certs/ca.crt",
                                               "--secret", "certs/superexec.secret"))
        self.register(*sites)
        self.wait_port(self.ray_port, ray_head, "ray")
        ports = {name: self.start_supernode(name, data, wait=False) for name, data in sites.items()}
        for name, port in ports.items():
            self.wait_port(port, self.named[f"supernode-{name}"][1], f"supernode-{name}")
            self.spawn(f"clientapp-{name}", deploy_command("clientapp", "--supernode", f"127.0.0.1:{port}",
                                                           "--local-certs", f"site-{name}"))
        for name in sites:
            self.wait_connected(f"supernode-{name}")

    def wait_connected(self, name: str, timeout: float = 300, patience: float = 120) -> None:
        """Until the SuperNode `name` runs and is activated on the SuperLink (its log shows its node
        id). Its Runtime API port opens before it dials the SuperLink, and a SuperNode exits when
        activation fails with an error Flower does not retry (an HTTP 500, a TLS error): an exited
        one, or one still not activated after `patience` s, is started again, as the compose
        restart policy does."""
        deadline, stalled = time.monotonic() + timeout, time.monotonic() + patience
        while "SuperNode ID: " not in self.log(name) or self.named[name][1].poll() is not None:
            if self.named[name][1].poll() is not None or time.monotonic() > stalled:
                self.kill(name)
                self.restart(name, timeout=max(deadline - time.monotonic(), 1))
                return
            time.sleep(0.5)

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
