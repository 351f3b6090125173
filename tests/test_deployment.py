"""Real deployment on 127.0.0.1, each component a real process started with the same `fedseek
deploy …` commands the docker-compose services run: a SuperLink with TLS and SuperNode
authentication, the ServerApp's SuperExec, a site Ray cluster, and three institutions (SuperNode +
ClientApp SuperExec each, TLS on the SuperNode <-> ClientApp link too), a real `mlflow server`
and a SQLite platform DB. A 2-round federated DP-LoRA job goes through the platform; a SuperNode
with an unregistered key and a plaintext SuperNode are refused. Everything is stopped at the end."""
from __future__ import annotations

import json
import socket
import time

import pytest
from sqlalchemy import create_engine, text

from fedseek.platform.deploy.local import BIN, deploy_command, free_port

pytestmark = pytest.mark.xdist_group("federation")  # conftest.FEDERATION_GROUP: one federation at a time

SITES = ("bank_a", "bank_b", "bank_c")
ROWS_PER_SITE = 160  # conftest.sqlite_federation's records per site
TEST_ROWS = 300  # the coordinator evaluates on a seeded subset of the test set (all 3080 rows: ~10 s a round)


@pytest.fixture(scope="module")
def federation(deployment):
    return deployment  # shared with test_deployment_resume.py (conftest.deployment)


def test_two_round_dp_job_over_tls_with_node_auth_is_recorded_by_the_platform(federation):
    root, env = federation.root, federation.env
    started = time.monotonic()
    proc = federation.run("run", "--superlink", federation.superlink, "--ca", "certs/ca.crt", "--institutions", "3",
                          "--rounds", "2", "--local-steps", "2", "--epsilon", "4", "--out", str(root / "job1"),
                          "--census-timeout", "300", "--set", f"data.max_test_rows={TEST_ROWS}", timeout=1200)
    print(f"deployed 2-round job: {time.monotonic() - started:.0f} s")
    logs = "\n".join(federation.log(n)[-1500:] for n in ("serverapp", *(f"supernode-{s}" for s in SITES)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:] + logs
    assert (root / "job1" / "report.json").is_file(), proc.stdout[-3000:] + logs
    report = json.loads((root / "job1" / "report.json").read_text())
    assert report["institutions"] == list(SITES)
    assert report["train_examples"] == {name: ROWS_PER_SITE for name in SITES}  # the census counts
    assert report["test_examples"] == TEST_ROWS
    assert len(report["rounds"]) == 2 and 0 < max(report["epsilon"].values()) <= 4.0
    engine = create_engine(env["FEDSEEK_DB_URL"])
    with engine.connect() as db:  # the federation's DB may hold other modules' jobs: this job's rows
        job_id, status, run_id = db.execute(text(
            "SELECT id, status, mlflow_run_id FROM jobs ORDER BY id DESC LIMIT 1")).one()
        assert status == "finished" and run_id
        assert db.execute(text("SELECT count(*) FROM rounds WHERE job_id = :j"), {"j": job_id}).scalar() == 2
        ledger = db.execute(text("SELECT i.name, count(*), max(l.epsilon_after) FROM privacy_ledger l JOIN "
                                 "institutions i ON i.id = l.institution_id WHERE l.job_id = :j GROUP BY i.name"),
                            {"j": job_id}).all()
        nodes = dict(db.execute(text("SELECT name, node_id FROM institutions")).all())
    engine.dispose()
    assert {name: count for name, count, _ in ledger} == {name: 2 for name in SITES}
    # the ledger's ε is each institution's lifetime ε: this job's own when it is the federation's first
    # (it is, in file order; run after test_deployment_resume.py it also holds that job's spending)
    if job_id == 1:
        assert all(abs(eps - report["epsilon"][name]) < 1e-6 for name, _, eps in ledger)
    else:
        assert all(eps >= report["epsilon"][name] - 1e-6 for name, _, eps in ledger)
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

