"""A running Flower job stops cleanly before the round that would exceed a budget: here another
job (of another task) charges bank_a's ledger while this one runs, as concurrent jobs can."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from sqlalchemy import create_engine, text

SCRIPT = r"""
import sys
from fedseek.config import JobConfig
from fedseek.platform.store.db import Institution, Job, LedgerEntry, get_or_create_task, session_scope
from fedseek.platform.run.jobs import run_job
from sqlalchemy import select

class ConcurrentCharge:
    "After round 1, a job elsewhere spends most of bank_a's remaining budget."
    def start(self, job, data, initial): pass
    def finish(self, report): pass
    def round(self, row):
        if row["round"] == 1:
            with session_scope(sys.argv[1]) as session:
                bank_a = session.scalars(select(Institution).filter_by(name="bank_a")).one()
                other = Job(task_id=get_or_create_task(session, "fraud").id, status="running", config_json="{}",
                            planned_rounds=1)
                session.add(other)
                session.flush()
                session.add(LedgerEntry(institution_id=bank_a.id, job_id=other.id, round_number=1, kind="train",
                                        data_scope="all", sigma=1.2, q=0.2, steps=60, clip=1.0, delta=1e-5,
                                        epsilon_after=0.0, epsilon_rdp_after=0.0))

job = JobConfig()
job.data.max_train_rows, job.data.max_test_rows, job.federation.rounds, job.optim.local_steps = 120, 200, 3, 2
job.privacy.target_epsilon, job.federation.out = 4.0, sys.argv[2]
run_job(job, ConcurrentCharge())
"""


def test_job_stops_before_the_round_that_would_exceed_the_budget(tmp_path):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "FEDSEEK_HOME": str(tmp_path / "home"), "FEDSEEK_DB_URL": url,
           "FEDSEEK_DEFAULT_EPSILON_MAX": "8.5"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, url, str(tmp_path / "out")], capture_output=True,
                          text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["stopped"].startswith("stopped before round 2: institution 'bank_a' would reach epsilon")
    assert [r["round"] for r in report["rounds"]] == [1]
    with create_engine(url).connect() as connection:
        status = connection.execute(text("SELECT status, message FROM jobs WHERE id = 1")).one()
        rounds = connection.execute(text("SELECT count(*) FROM rounds")).scalar()
        worst = connection.execute(text("SELECT max(epsilon_after) FROM privacy_ledger")).scalar()
        decisions = connection.execute(text("SELECT count(*) FROM promotion_decisions")).scalar()
    assert status[0] == "stopped" and "bank_a" in status[1]
    assert rounds == 1 and worst <= 8.5 and decisions == 0  # a stopped job is not promoted
