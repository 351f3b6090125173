"""Coordinator fault in a real deployment (issue 7 item 2): the ServerApp process of a running
3-round DP job is SIGKILLed once round 1 is committed; `fedseek deploy run --resume 1` continues the
same platform job on the same federation (TLS, SuperNode authentication, Ray site workers): every
round is committed once, each institution is charged once per round, the job ends `finished`.
The federation is `LocalFederation` (real flower-superlink / flower-supernode / flower-superexec
processes on 127.0.0.1), shared with test_deployment.py (conftest.deployment): this job's rows are
queried by its id."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time

import psutil
import pytest
from sqlalchemy import create_engine, text

from fedseek.platform.deploy.local import deploy_command

pytestmark = pytest.mark.xdist_group("federation")  # conftest.FEDERATION_GROUP: one federation at a time

SITES = ("bank_a", "bank_b", "bank_c")


@pytest.fixture(scope="module")
def federation(deployment):
    return deployment


def db_state(url: str, job: int | None = None) -> tuple[int, str | None, list[int], list[tuple[str, int]]]:
    """(the job's id — default: the newest job —, its status, committed rounds, ledger entries)."""
    engine = create_engine(url)
    try:
        with engine.connect() as db:
            if not db.dialect.has_table(db, "jobs"):
                return 0, None, [], []
            job = job or db.execute(text("SELECT coalesce(max(id), 0) FROM jobs")).scalar()
            status = db.execute(text("SELECT status FROM jobs WHERE id = :j"), {"j": job}).scalar()
            rounds = [r for (r,) in db.execute(text("SELECT number FROM rounds WHERE job_id = :j ORDER BY number"),
                                               {"j": job})]
            ledger = [tuple(r) for r in db.execute(text(
                "SELECT i.name, l.round_number FROM privacy_ledger l JOIN institutions i ON i.id = l.institution_id "
                "WHERE l.job_id = :j ORDER BY i.name, l.round_number"), {"j": job})]
            return job, status, rounds, ledger
    finally:
        engine.dispose()


def test_a_killed_serverapp_is_resumed_on_the_deployment(federation):
    root, env, url = federation.root, federation.env, federation.env["FEDSEEK_DB_URL"]
    job = ["--superlink", federation.superlink, "--ca", "certs/ca.crt", "--census-timeout", "300"]
    earlier = db_state(url)[0]  # jobs other modules ran on the shared federation
    first = subprocess.Popen(deploy_command("run", *job, "--institutions", "3", "--rounds", "3", "--local-steps", "2",
                                            "--epsilon", "4", "--out", str(root / "resumed-job"),
                                            "--set", "data.max_test_rows=300"),
                             env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    superexec = psutil.Process(federation.named["serverapp"][1].pid)  # the ServerApp SuperExec
    assert "flower-superexec" in " ".join(superexec.cmdline()) and "clientapp" not in " ".join(superexec.cmdline())
    killed = []
    try:
        deadline, (job_id, _, rounds, _) = time.monotonic() + 1500, db_state(url)
        while not (job_id > earlier and rounds) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            job_id, _, rounds, _ = db_state(url)
        assert job_id > earlier and rounds[:1] == [1], first.communicate()[0][-3000:] if first.poll() else ""
        for child in superexec.children(recursive=True):  # the run's ServerApp process(es)
            killed.append(" ".join(child.cmdline())[:200])
            child.kill()
    finally:
        with contextlib.suppress(ProcessLookupError):  # already gone: e.g. the job failed on its own
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert killed, "no ServerApp process found under the SuperExec"
    _, status, rounds, _ = db_state(url, job_id)
    assert status == "running" and 1 <= len(rounds) < 3, (status, rounds)

    resumed = subprocess.run(deploy_command("run", *job, "--resume", str(job_id)), env=env, cwd=root,
                             capture_output=True, text=True, timeout=1800)
    logs = federation.log("serverapp")[-3000:]
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-2000:] + logs
    _, status, rounds, ledger = db_state(url, job_id)
    assert status == "finished" and rounds == [1, 2, 3]
    assert ledger == [(name, r) for name in SITES for r in (1, 2, 3)]  # charged once per round
    report = json.loads((root / "resumed-job" / "report.json").read_text())
    assert report["resumed_after_round"] >= 1
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert 0 < max(report["epsilon"].values()) <= 4.0
