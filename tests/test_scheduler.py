"""Scheduled retraining: schedules in the platform DB, APScheduler's SQLAlchemy job store, the
pre-flight refusal of scheduled jobs, no overlapping jobs of one task, and a real `fedseek
scheduler run` process that retrains when new data lands in a watched directory."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import inspect, select, text

from fedseek.platform.run.scheduler import _task_lock, add_schedule, build_scheduler, run_schedule
from fedseek.platform.store.db import Institution, Schedule, engine_for, session_scope

TINY = ["--max-train-rows", "120", "--max-test-rows", "200", "--rounds", "1", "--local-steps", "2", "--epsilon", "2"]


def test_schedules_are_validated_and_mirrored_in_the_job_store(db_url, tmp_path):
    with pytest.raises(ValueError, match="--cron '0 2 \\* \\*'"):
        add_schedule(db_url, "banking77", "0 2 * *", None, 60, [])
    with pytest.raises(ValueError, match="exactly one trigger"):
        add_schedule(db_url, "banking77", "0 2 * * 1", str(tmp_path), 60, [])
    with pytest.raises(ValueError, match="not a directory"):
        add_schedule(db_url, "banking77", None, str(tmp_path / "missing"), 60, [])
    weekly = add_schedule(db_url, "banking77", "0 2 * * 1", None, 60, TINY)
    watched = add_schedule(db_url, "medical_abstracts", None, str(tmp_path), 5, [])
    scheduler = build_scheduler(db_url, str(tmp_path))
    try:
        jobs = {job.id: job for job in scheduler.get_jobs()}
        assert set(jobs) == {f"schedule-{weekly}", f"schedule-{watched}"}
        assert all(job.coalesce and job.max_instances == 1 for job in jobs.values())
        assert "cron[month='*', day='*', day_of_week='1', hour='2', minute='0']" in str(jobs[f"schedule-{weekly}"].trigger)
    finally:
        scheduler.shutdown(wait=False)
    assert "apscheduler_jobs" in inspect(engine_for(db_url)).get_table_names()
    with engine_for(db_url).connect() as connection:  # persisted in the platform DB
        assert connection.execute(text("SELECT count(*) FROM apscheduler_jobs")).scalar() == 2


def test_no_two_jobs_of_one_task_at_once_and_first_poll_sets_the_baseline(tmp_path):
    db_url, inbox = f"sqlite:///{tmp_path / 'p.db'}", tmp_path / "inbox"
    inbox.mkdir()
    sid = add_schedule(db_url, "banking77", None, str(inbox), 1, TINY)
    assert run_schedule(sid, db_url, str(tmp_path), poll=True) == "no new data"  # baseline
    assert run_schedule(sid, db_url, str(tmp_path), poll=True) == "no new data"
    held = _task_lock(tmp_path, "banking77")
    try:
        (inbox / "new.csv").write_text("text,label\nhello,a\n")
        outcome = run_schedule(sid, db_url, str(tmp_path), poll=True)
    finally:
        held.close()
    assert outcome == "skipped: a job of task banking77 is already running"
    with session_scope(db_url) as session:
        assert session.get(Schedule, sid).last_outcome == outcome


def test_scheduled_job_goes_through_the_preflight_refusal(tmp_path):
    db_url = f"sqlite:///{tmp_path / 'p.db'}"
    with session_scope(db_url) as session:
        session.add(Institution(name="bank_a", kind="bank", epsilon_max=0.5, delta=1e-5))
    sid = add_schedule(db_url, "banking77", "0 2 * * 1", None, 60, TINY)
    outcome = run_schedule(sid, db_url, str(tmp_path / "home"))
    assert outcome.startswith("refused: ") and "'bank_a' would exceed its privacy budget" in outcome
    with engine_for(db_url).connect() as connection:
        assert connection.execute(text("SELECT status FROM jobs")).scalars().all() == ["refused"]
        assert connection.execute(text("SELECT count(*) FROM privacy_ledger")).scalar() == 0


def test_scheduler_service_retrains_when_new_data_arrives(tmp_path):
    watched = tmp_path / "bank_a_inbox"
    watched.mkdir()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "FEDSEEK_HOME": str(tmp_path / "home"),
           "FEDSEEK_DB_URL": f"sqlite:///{tmp_path / 'p.db'}"}
    add = subprocess.run([sys.executable, "-m", "fedseek", "schedule", "add", "--task", "banking77", "--watch-dir",
                          str(watched), "--poll-seconds", "2", "--options", " ".join(TINY)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert add.returncode == 0, add.stderr
    service = subprocess.Popen([sys.executable, "-m", "fedseek", "scheduler", "run"], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    url = env["FEDSEEK_DB_URL"]
    try:
        _wait(lambda: _schedule(url).data_fingerprint is not None, service, "the first poll")
        (watched / "2026-11.csv").write_text("text,label\nmy card has not arrived,card_arrival\n")
        _wait(lambda: _schedule(url).last_outcome is not None, service, "the scheduled job")
        assert _schedule(url).last_outcome == "finished"
        with engine_for(url).connect() as connection:
            assert connection.execute(text("SELECT status FROM jobs")).scalars().all() == ["finished"]
            assert connection.execute(text("SELECT count(*) FROM privacy_ledger")).scalar() == 3
    finally:
        os.killpg(service.pid, signal.SIGTERM)
        output = service.communicate(timeout=60)[0]
    assert service.returncode == 0, output[-3000:]


def _schedule(url: str) -> Schedule:
    with session_scope(url) as session:
        return session.scalars(select(Schedule)).one()


def _wait(condition, process: subprocess.Popen, what: str, limit_s: float = 900) -> None:
    """Poll until `condition()` holds (a bound on a hung service, not a timing assertion)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"scheduler exited before {what}: {process.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {limit_s}s")
        time.sleep(1)


def test_a_deploy_schedule_launches_fedseek_deploy_run(db_url, tmp_path):
    with pytest.raises(ValueError, match="runner"):
        add_schedule(db_url, "banking77", "0 2 * * 1", None, 60, [], runner="kubernetes")
    sid = add_schedule(db_url, "banking77", "0 2 * * 1", None, 60,
                       ["--superlink", "127.0.0.1:9", "--ca", str(tmp_path / "no-ca.crt")], runner="deploy")
    outcome = run_schedule(sid, db_url, str(tmp_path))
    assert outcome.startswith("failed:") and "no-ca.crt: no such file" in outcome  # deploy run's own check
