"""Real deployment on 127.0.0.1, each component a real process started with the same `fedseek
deploy …` commands the docker-compose services run: a SuperLink with TLS and SuperNode
authentication, the ServerApp's SuperExec, a site Ray cluster, and three institutions (SuperNode +
ClientApp SuperExec each, TLS on the SuperNode <-> ClientApp link too), a real `mlflow server`
and a SQLite platform DB. A 2-round federated DP-LoRA job goes through the platform; a SuperNode
with an unregistered key and a plaintext SuperNode are refused. Everything is stopped at the end."""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, start_mlflow_server, stop
from sqlalchemy import create_engine, text

BIN = Path(sys.executable).parent
SITES = ("bank_a", "bank_b", "bank_c")
ROWS_PER_SITE = 160


def fedseek_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedseek", "deploy", *args]


def wait_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:4]} exited: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"port {port} not open after {timeout}s: {log.read_text()[-2000:]}")


class Processes:
    def __init__(self, root: Path, env: dict):
        self.root, self.env, self.started = root, env, []

    def start(self, name: str, command: list[str], env: dict | None = None) -> subprocess.Popen:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        proc = subprocess.Popen(command, env=env or self.env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=self.root)
        self.started.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.root / "logs" / f"{name}.log").read_text()

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.started):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def write_site_files(root: Path) -> None:
    from fedseek.data.tasks import load_federated_data

    data = load_federated_data("banking77", institutions=3, seed=0)
    for name, rows in zip(SITES, data.train):
        with (root / f"{name}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            for text_, label in list(zip(rows.texts, rows.labels))[:ROWS_PER_SITE]:
                writer.writerow([text_, data.label_names[label]])


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    mlflow_port, link_port, ray_port = free_port(), free_port(), free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "FEDSEEK_HOME": str(root / "home"),
           "FEDSEEK_DB_URL": f"sqlite:///{root / 'platform.db'}", "FEDSEEK_DEFAULT_EPSILON_MAX": "20",
           "FEDSEEK_MLFLOW_URI": f"http://127.0.0.1:{mlflow_port}", "FLWR_HOME": str(root / "flwr"),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_ADDRESS": "",
           "FEDSEEK_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1"}
    procs = Processes(root, env)
    run = lambda *args: subprocess.run(fedseek_cmd(*args), env=env, cwd=root, capture_output=True,  # noqa: E731
                                       text=True, timeout=300)
    superlink = f"127.0.0.1:{link_port}"
    state = {"root": root, "env": env, "procs": procs, "superlink": superlink, "link_port": link_port,
             "ray_port": ray_port}
    try:
        assert run("certs", "--out", "certs", "--host", "localhost", "--host", "127.0.0.1").returncode == 0
        for name in (*SITES, "rogue"):
            made = run("keys", "--out", "keys", "--institution", name)
            assert made.returncode == 0, made.stderr
            assert run("certs", "--out", f"site-{name}", "--host", "127.0.0.1").returncode == 0
        write_site_files(root)
        state["mlflow"] = start_mlflow_server(f"sqlite:///{root / 'mlflow.db'}", str(root / "mlartifacts"),
                                              mlflow_port)
        link = procs.start("superlink", fedseek_cmd("superlink", "--certs", "certs", "--state", "state",
                                                    "--host", "127.0.0.1", "--port", str(link_port)))
        wait_port(link_port, link, root / "logs" / "superlink.log")
        procs.start("serverapp", fedseek_cmd("serverapp", "--superlink", superlink, "--ca", "certs/ca.crt",
                                             "--secret", "certs/superexec.secret"))
        ray_head = procs.start("ray", [str(BIN / "ray"), "start", "--head", "--block", "--port", str(ray_port),
                                       "--node-ip-address", "127.0.0.1", "--num-cpus", "3", "--num-gpus", "0",
                                       "--include-dashboard", "false", "--disable-usage-stats"])
        wait_port(ray_port, ray_head, root / "logs" / "ray.log")
        for name in SITES:
            registered = run("register", "--superlink", superlink, "--ca", "certs/ca.crt", "--institution", name,
                             "--public-key", f"keys/{name}.pub")
            assert registered.returncode == 0, registered.stdout + registered.stderr
        for name in SITES:
            node_port = free_port()
            procs.start(f"supernode-{name}", fedseek_cmd(
                "supernode", "--superlink", superlink, "--ca", "certs/ca.crt", "--key", f"keys/{name}.key",
                "--institution", name, "--data", f"{name}.csv", "--port", str(node_port),
                "--ray-address", f"127.0.0.1:{ray_port}", "--num-cpus", "1", "--local-certs", f"site-{name}"))
            wait_port(node_port, procs.started[-1], root / "logs" / f"supernode-{name}.log")
            procs.start(f"clientapp-{name}", fedseek_cmd("clientapp", "--supernode", f"127.0.0.1:{node_port}",
                                                         "--local-certs", f"site-{name}"))
        yield state
    finally:
        procs.stop_all()
        advertised = Path("/tmp/ray/ray_current_cluster")  # `ray start` advertises its head here
        if advertised.is_file() and advertised.read_text().strip().endswith(f":{ray_port}"):
            advertised.unlink()
        if "mlflow" in state:
            stop(state["mlflow"])


def test_two_round_dp_job_over_tls_with_node_auth_is_recorded_by_the_platform(federation):
    root, env = federation["root"], federation["env"]
    started = time.monotonic()
    proc = subprocess.run(fedseek_cmd("run", "--superlink", federation["superlink"], "--ca", "certs/ca.crt",
                                      "--institutions", "3", "--rounds", "2", "--local-steps", "2",
                                      "--epsilon", "4", "--out", str(root / "job1"), "--census-timeout", "120"),
                          env=env, cwd=root, capture_output=True, text=True, timeout=1200)
    print(f"deployed 2-round job: {time.monotonic() - started:.0f} s")
    logs = "\n".join(federation["procs"].log(n)[-1500:] for n in ("serverapp", "supernode-bank_a"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:] + logs
    assert (root / "job1" / "report.json").is_file(), proc.stdout[-3000:] + logs
    report = json.loads((root / "job1" / "report.json").read_text())
    assert report["institutions"] == list(SITES)
    assert report["train_examples"] == {name: ROWS_PER_SITE for name in SITES}  # the census counts
    assert len(report["rounds"]) == 2 and 0 < max(report["epsilon"].values()) <= 4.0
    engine = create_engine(env["FEDSEEK_DB_URL"])
    with engine.connect() as db:
        status, run_id = db.execute(text("SELECT status, mlflow_run_id FROM jobs")).one()
        assert status == "finished" and run_id
        assert db.execute(text("SELECT count(*) FROM rounds")).scalar() == 2
        ledger = db.execute(text("SELECT i.name, count(*), max(l.epsilon_after) FROM privacy_ledger l JOIN "
                                 "institutions i ON i.id = l.institution_id GROUP BY i.name")).all()
        nodes = dict(db.execute(text("SELECT name, node_id FROM institutions")).all())
    assert {name: count for name, count, _ in ledger} == {name: 2 for name in SITES}
    assert all(abs(eps - report["epsilon"][name]) < 1e-6 for name, _, eps in ledger)
    assert set(nodes) == set(SITES) and all(nodes.values())
    from mlflow.tracking import MlflowClient

    run = MlflowClient(env["FEDSEEK_MLFLOW_URI"]).get_run(run_id)
    assert run.data.metrics["accuracy"] == pytest.approx(report["final_accuracy"])
    # local training ran on each site's Ray worker (named actors), not in the per-message process
    import ray

    ray.init(address=f"127.0.0.1:{federation['ray_port']}", namespace="fedseek", log_to_driver=False)
    try:
        for name in SITES:
            assert ray.get_actor(f"site-{name}").resources.remote() is not None
    finally:
        ray.shutdown()


def test_a_supernode_with_an_unregistered_key_is_refused(federation):
    root = federation["root"]
    proc = subprocess.run(fedseek_cmd("supernode", "--superlink", federation["superlink"], "--ca", "certs/ca.crt",
                                      "--key", "keys/rogue.key", "--institution", "rogue", "--data", "bank_a.csv",
                                      "--port", str(free_port()), "--max-wait-time", "15"),
                          env=federation["env"], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Failed to activate SuperNode" in proc.stdout + proc.stderr
    assert "No SuperNode found with the given public key" in federation["procs"].log("superlink")


def test_a_plaintext_supernode_and_a_plain_http_request_are_refused(federation):
    root, port = federation["root"], federation["link_port"]
    plain = federation["procs"].start("plaintext", [
        str(BIN / "flower-supernode"), "--superlink", federation["superlink"], "--insecure",
        "--node-config", 'institution="plain"', "--port", str(free_port()), "--max-wait-time", "10"])
    assert plain.wait(timeout=120) != 0
    assert "could not establish a connection" in federation["procs"].log("plaintext")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # HTTP without TLS
        sock.sendall(b"POST /v1/fleet/activate-node HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        sock.settimeout(10)
        try:
            answer = sock.recv(1024)
        except (ConnectionResetError, socket.timeout):
            answer = b""
    assert not answer.startswith(b"HTTP/1.1 2")
