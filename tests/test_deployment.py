"""Real deployment on 127.0.0.1, each component a real process started with the same `fedseek
deploy …` commands the docker-compose services run: a SuperLink with TLS and SuperNode
authentication, the ServerApp's SuperExec, a site Ray cluster, and three institutions (SuperNode +
ClientApp SuperExec each, TLS on the SuperNode <-> ClientApp link too), a real `mlflow server`
and a SQLite platform DB. A 2-round federated DP-LoRA job goes through the platform; a SuperNode
with an unregistered key and a plaintext SuperNode are refused. Everything is stopped at the end."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
from conftest import start_mlflow_server, stop
from sqlalchemy import create_engine, text

from fedseek.platform.deploy.local import BIN, LocalFederation, deploy_command, free_port, write_demo_sites

SITES = ("bank_a", "bank_b", "bank_c")
ROWS_PER_SITE = 160


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    mlflow_port = free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "FEDSEEK_HOME": str(root / "home"),
           "FEDSEEK_DB_URL": f"sqlite:///{root / 'platform.db'}", "FEDSEEK_DEFAULT_EPSILON_MAX": "20",
           "FEDSEEK_MLFLOW_URI": f"http://127.0.0.1:{mlflow_port}", "FEDSEEK_TORCH_THREADS": "1",
           "OMP_NUM_THREADS": "1"}
    fed = LocalFederation(root, env)
    mlflow = None
    try:
        mlflow = start_mlflow_server(f"sqlite:///{root / 'mlflow.db'}", str(root / "mlartifacts"), mlflow_port)
        fed.start(write_demo_sites(root, SITES, ROWS_PER_SITE), extra_keys=("rogue",))
        yield fed
    finally:
        fed.stop()
        if mlflow is not None:
            stop(mlflow)


def test_two_round_dp_job_over_tls_with_node_auth_is_recorded_by_the_platform(federation):
    root, env = federation.root, federation.env
    started = time.monotonic()
    proc = federation.run("run", "--superlink", federation.superlink, "--ca", "certs/ca.crt", "--institutions", "3",
                          "--rounds", "2", "--local-steps", "2", "--epsilon", "4", "--out", str(root / "job1"),
                          "--census-timeout", "120", timeout=1200)
    print(f"deployed 2-round job: {time.monotonic() - started:.0f} s")
    logs = "\n".join(federation.log(n)[-1500:] for n in ("serverapp", "supernode-bank_a"))
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
    # each site's own privacy history lives under its FEDSEEK_HOME, never in the user's ~/.fedseek
    assert all((root / "home" / "site" / f"{name}.privacy.db").is_file() for name in SITES)
    from mlflow.tracking import MlflowClient

    run = MlflowClient(env["FEDSEEK_MLFLOW_URI"]).get_run(run_id)
    assert run.data.metrics["accuracy"] == pytest.approx(report["final_accuracy"])
    # local training ran on each site's Ray worker (named actors), not in the per-message process
    import ray

    ray.init(address=f"127.0.0.1:{federation.ray_port}", namespace="fedseek", log_to_driver=False)
    try:
        for name in SITES:
            assert ray.get_actor(f"site-{name}").resources.remote() is not None
    finally:
        ray.shutdown()


def test_a_supernode_with_an_unregistered_key_is_refused(federation):
    rogue = federation.spawn("rogue", deploy_command(
        "supernode", "--superlink", federation.superlink, "--ca", "certs/ca.crt", "--key", "keys/rogue.key",
        "--institution", "rogue", "--data", "bank_a.csv", "--port", str(free_port()), "--max-wait-time", "15"))
    assert rogue.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in federation.log("rogue")
    assert "No SuperNode found with the given public key" in federation.log("superlink")


def test_a_plaintext_supernode_and_a_plain_http_request_are_refused(federation):
    port = federation.link_port
    plain = federation.spawn("plaintext", [
        str(BIN / "flower-supernode"), "--superlink", federation.superlink, "--insecure",
        "--node-config", 'institution="plain"', "--port", str(free_port()), "--max-wait-time", "10"])
    assert plain.wait(timeout=120) != 0
    assert "could not establish a connection" in federation.log("plaintext")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # HTTP without TLS
        sock.sendall(b"POST /v1/fleet/activate-node HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        sock.settimeout(10)
        try:
            answer = sock.recv(1024)
        except (ConnectionResetError, socket.timeout):
            answer = b""
    assert not answer.startswith(b"HTTP/1.1 2")

