"""Scheduled retraining: APScheduler 3 with its SQLAlchemyJobStore on the platform DB.

A schedule (table `schedules`) runs `fedseek simulate --task T <its options>` (or, with runner
`deploy`, `fedseek deploy run --task T <its options>` over the deployed federation) in a subprocess
either on a cron expression or when an institution's data directory changes (a new file, or rows
added to one: polled every `poll_seconds`). Every run goes through the same pre-flight privacy
check as a manual job (a refused run is recorded, nothing is trained). Missed runs are coalesced
into one; no two jobs of the same task run at once (APScheduler max_instances=1 per schedule and
a per-task file lock across schedules and processes).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import select

from fedseek.platform.store.db import Schedule, session_scope, utcnow

logger = logging.getLogger("fedseek.scheduler")
JOB_DEFAULTS = {"coalesce": True, "max_instances": 1, "misfire_grace_time": 24 * 3600}


def data_fingerprint(directory: Path) -> str:
    """Changes when a file is added, removed or grows (rows appended) in `directory`."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.relative_to(directory)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _task_lock(home: Path, task: str):
    """An exclusive, non-blocking per-task lock (released by the OS if the process dies)."""
    path = home / "locks" / f"task-{task}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def run_schedule(schedule_id: int, db_url: str, home: str, poll: bool = False) -> str:
    """Run the job of a schedule now (a new-data poll first checks for new data); the outcome."""
    with session_scope(db_url) as session:
        schedule = session.get(Schedule, schedule_id)
        if schedule is None or not schedule.enabled:
            return "schedule removed or disabled"
        task, args, runner = schedule.task_name, json.loads(schedule.job_args), schedule.runner
        if poll:
            current = data_fingerprint(Path(schedule.watch_dir))
            seen, schedule.data_fingerprint = schedule.data_fingerprint, current
            if seen is None or seen == current:  # first look sets the baseline
                return "no new data"
    lock = _task_lock(Path(home), task)
    if lock is None:
        return _record(db_url, schedule_id, f"skipped: a job of task {task} is already running")
    try:
        env = {**os.environ, "FEDSEEK_DB_URL": db_url, "FEDSEEK_HOME": home, "PYTHONWARNINGS": "ignore"}
        command = ["deploy", "run"] if runner == "deploy" else ["simulate"]
        proc = subprocess.run([sys.executable, "-m", "fedseek", *command, "--task", task, *args],
                              capture_output=True, text=True, env=env)
    finally:
        lock.close()
    if proc.returncode == 0:
        outcome = "finished"
    else:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        outcome = ("refused: " if "privacy budget" in proc.stderr else "failed: ") + " ".join(lines[-3:])[-1000:]
    return _record(db_url, schedule_id, outcome)


def _record(db_url: str, schedule_id: int, outcome: str) -> str:
    logger.warning("schedule %s: %s", schedule_id, outcome)
    with session_scope(db_url) as session:
        schedule = session.get(Schedule, schedule_id)
        if schedule is not None:
            schedule.last_run_at, schedule.last_outcome = utcnow(), outcome
    return outcome


def add_schedule(db_url: str, task: str, cron: str | None, watch_dir: str | None, poll_seconds: int,
                 job_args: list[str], runner: str = "simulate") -> int:
    """`runner`: `simulate` (a simulated federation) or `deploy` (`fedseek deploy run` over the
    deployed federation; `job_args` then include --superlink and --ca)."""
    if runner not in ("simulate", "deploy"):
        raise ValueError(f"runner {runner!r}: expected simulate or deploy")
    if bool(cron) == bool(watch_dir):
        raise ValueError("give exactly one trigger: --cron EXPR or --watch-dir DIR")
    if cron:
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(cron)
        except ValueError as err:
            raise ValueError(f"--cron {cron!r}: {err}") from None
    if watch_dir and not Path(watch_dir).is_dir():
        raise ValueError(f"--watch-dir {watch_dir}: not a directory")
    with session_scope(db_url) as session:
        row = Schedule(task_name=task, trigger="cron" if cron else "new-data", cron=cron,
                       watch_dir=str(Path(watch_dir).resolve()) if watch_dir else None,
                       poll_seconds=poll_seconds, job_args=json.dumps(job_args), runner=runner)
        session.add(row)
        session.flush()
        return row.id


def build_scheduler(db_url: str, home: str):
    """A started, paused BackgroundScheduler whose jobs mirror the enabled schedules (kept in the
    DB job store); `resume()` it."""
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    scheduler = BackgroundScheduler(jobstores={"default": SQLAlchemyJobStore(url=db_url)},
                                  job_defaults=JOB_DEFAULTS, timezone="UTC")
    scheduler.start(paused=True)
    with session_scope(db_url) as session:
        schedules = session.scalars(select(Schedule)).all()
        wanted = {f"schedule-{s.id}" for s in schedules if s.enabled}
        for job in scheduler.get_jobs():
            if job.id not in wanted:
                job.remove()
        for s in schedules:
            if not s.enabled:
                continue
            poll = s.trigger == "new-data"
            trigger = IntervalTrigger(seconds=s.poll_seconds) if poll else CronTrigger.from_crontab(s.cron, timezone="UTC")
            scheduler.add_job(run_schedule, trigger, id=f"schedule-{s.id}", name=f"{s.task_name} ({s.trigger})",
                              args=[s.id, db_url, home, poll], replace_existing=True)
    return scheduler
