"""`fedseek schedule ...` and `fedseek scheduler run`."""
from __future__ import annotations

import json
import shlex

import typer
from rich.table import Table

from fedseek.platform.cli.common import console, fail, session as _session, settings as _settings


def register(schedule_app: typer.Typer, scheduler_app: typer.Typer) -> None:
    @schedule_app.command("add")
    def add(task: str = typer.Option(..., help="Task to retrain (as for `fedseek simulate --task`)."),
            cron: str = typer.Option(None, help="Crontab expression in UTC, e.g. '0 2 * * 1'."),
            watch_dir: str = typer.Option(None, help="Retrain when this data directory gets new files/rows."),
            poll_seconds: int = typer.Option(60, min=1, help="How often --watch-dir is checked."),
            options: str = typer.Option("", help="More `fedseek simulate` options, e.g. '--rounds 3 --epsilon 4' "
                                        "(with --deploy: `fedseek deploy run` options incl. --superlink, --ca)."),
            deploy: bool = typer.Option(False, "--deploy", help="Run the job over the deployed federation "
                                        "(`fedseek deploy run`) instead of a simulation.")
            ) -> None:
        """Add a retraining schedule (picked up when `fedseek scheduler run` starts)."""
        from fedseek.platform.run.scheduler import add_schedule

        try:
            sid = add_schedule(_settings().database_url, task, cron, watch_dir, poll_seconds, shlex.split(options),
                               runner="deploy" if deploy else "simulate")
        except ValueError as err:
            fail(str(err))
        console.print(f"schedule {sid}: task {task}, " + (f"cron '{cron}'" if cron else f"new data in {watch_dir}"))

    @schedule_app.command("list")
    def list_schedules() -> None:
        """List schedules with their last outcome."""
        from sqlalchemy import select

        from fedseek.platform.store.db import Schedule

        table = Table("id", "task", "trigger", "runs", "enabled", "last run", "last outcome", title="schedules")
        with _session() as session:
            for s in session.scalars(select(Schedule).order_by(Schedule.id)):
                trigger = s.cron if s.trigger == "cron" else f"new data in {s.watch_dir} (every {s.poll_seconds}s)"
                command = ("deploy run " if s.runner == "deploy" else "simulate ") + " ".join(json.loads(s.job_args))
                table.add_row(str(s.id), s.task_name, trigger, command, str(s.enabled),
                              str(s.last_run_at or "-")[:19], (s.last_outcome or "-")[:120])
        console.print(table)

    @schedule_app.command("remove")
    def remove(schedule_id: int = typer.Argument(..., help="Schedule id (see `fedseek schedule list`).")) -> None:
        """Disable a schedule."""
        from fedseek.platform.store.db import Schedule

        with _session() as session:
            row = session.get(Schedule, schedule_id)
            if row is None:
                fail(f"no schedule {schedule_id}")
            row.enabled = False
        console.print(f"schedule {schedule_id} disabled")

    @scheduler_app.command("run")
    def run() -> None:
        """Run the scheduler service in the foreground (Ctrl-C / SIGTERM stops it)."""
        import logging
        import signal
        import threading

        from fedseek.platform.run.scheduler import build_scheduler

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
        settings = _settings()
        scheduler = build_scheduler(settings.database_url, str(settings.home_dir))
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        console.print(f"scheduler: {len(scheduler.get_jobs())} schedule(s) running", highlight=False)
        scheduler.resume()
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
        scheduler.shutdown(wait=False)
