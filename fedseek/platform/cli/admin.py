"""Platform admin commands of `fedseek`: db, institutions, tasks, jobs, privacy, versions, promote,
dashboard, schedule, scheduler. Settings come from FEDSEEK_* (fedseek/platform/store/settings.py)."""
from __future__ import annotations

import json

import os
import subprocess
import sys
from enum import Enum
from pathlib import Path

import typer
from rich.table import Table

from fedseek.platform.cli.common import console, fail, mlflow_client, session as _session, settings as _settings

db_app = typer.Typer(help="Platform database: migrations and the MLflow outbox.", no_args_is_help=True)
institutions_app = typer.Typer(help="Institutions and their lifetime privacy budgets.", no_args_is_help=True)
schedule_app = typer.Typer(help="Scheduled retraining (cron or new-data triggers).", no_args_is_help=True)
scheduler_app = typer.Typer(help="The scheduler service.", no_args_is_help=True)


class Kind(str, Enum):
    hospital = "hospital"
    bank = "bank"
    site = "site"


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="Alembic revision to migrate to.")) -> None:
    """Create or migrate the platform DB (FEDSEEK_DB_URL) to the latest schema."""
    from fedseek.platform.store.db import upgrade

    url = _settings().database_url
    try:
        upgrade(url, revision)
    except Exception as err:  # unreachable server, bad URL, unknown revision
        fail(f"{_safe(url)}: {str(err).splitlines()[0]}")
    console.print(f"platform DB {_safe(url)} at revision {revision}")


@db_app.command("flush")
def db_flush() -> None:
    """Send MLflow records buffered while the tracking server was unreachable."""
    from fedseek.platform.mlflow.tracking import flush_all

    s = _settings()
    sent, pending = flush_all(s.outbox_dir, s.tracking_uri, s.artifact_root)
    console.print(f"sent {sent} job journal(s); {pending} still pending")
    if pending:
        raise typer.Exit(code=1)


def _safe(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@institutions_app.command("add")
def institutions_add(
    name: str = typer.Argument(..., help="Institution name as its jobs report it (e.g. hospital_a)."),
    kind: Kind = typer.Option(Kind.site, help="hospital | bank | site."),
    epsilon_max: float = typer.Option(..., min=0.0, help="Lifetime privacy budget over every job."),
    delta: float = typer.Option(None, min=0.0, max=1.0, help="delta of the budget (default: its first job's)."),
) -> None:
    """Register an institution, or change its budget."""
    from sqlalchemy import select

    from fedseek.platform.store import ledger
    from fedseek.platform.store.db import Institution

    with _session() as session:
        row = session.scalars(select(Institution).filter_by(name=name)).one_or_none()
        if row is not None and ledger.spent(session, row) > epsilon_max:
            fail(f"{name} has already spent epsilon {ledger.spent(session, row):.3f} > {epsilon_max:g}")
        row = row or Institution(name=name, kind=kind.value, epsilon_max=epsilon_max, delta=delta)
        row.kind, row.epsilon_max, row.delta = kind.value, epsilon_max, delta if delta is not None else row.delta
        session.add(row)
    console.print(f"{name}: {kind.value}, epsilon_max {epsilon_max:g}")


@institutions_app.command("list")
def institutions_list() -> None:
    """List institutions with their budgets."""
    privacy(plot=None)


def privacy(plot: Path = typer.Option(None, help="Also write epsilon over time per institution to this PNG.")) -> None:
    """Privacy budget per institution: spent (PRV headline, RDP alongside) over every job, round and
    Fisher pass in the ledger, and what remains."""
    from sqlalchemy import select

    from fedseek.platform.store import ledger
    from fedseek.platform.store.db import Institution, LedgerEntry

    table = Table("institution", "kind", "epsilon_max", "delta", "spent (PRV)", "spent (RDP)", "remaining",
                  "entries", title="privacy ledger")
    series, budgets = {}, {}
    with _session() as session:
        for inst in session.scalars(select(Institution).order_by(Institution.name)):
            entries = session.scalars(select(LedgerEntry).filter_by(institution_id=inst.id)
                                      .order_by(LedgerEntry.id)).all()
            prv, rdp = ledger.spent(session, inst), ledger.spent(session, inst, "rdp")
            table.add_row(inst.name, inst.kind, f"{inst.epsilon_max:g}", f"{inst.delta or 0:.1e}",
                          f"{prv:.3f}", f"{rdp:.3f}", f"{max(inst.epsilon_max - prv, 0):.3f}", str(len(entries)))
            series[inst.name] = [(e.created_at, e.epsilon_after) for e in entries]
            budgets[inst.name] = inst.epsilon_max
    console.print(table)
    if plot:
        from fedseek.platform.mlflow.plots import epsilon_over_time

        console.print(f"plot: {epsilon_over_time(series, budgets, plot, xlabel='time (UTC)')}")


def tasks(add: str = typer.Option(None, "--add", help="Register a task with this name first."),
          description: str = typer.Option("", help="Description of the task given with --add.")) -> None:
    """List tasks with their jobs and registered model (jobs register their task themselves)."""
    from sqlalchemy import func, select

    from fedseek.platform.store.db import Job, Task, get_or_create_task
    from fedseek.platform.mlflow.registry import model_name

    if add:
        with _session() as session:
            get_or_create_task(session, add).description = description
    table = Table("task", "jobs", "last job", "registered model", title="tasks")
    with _session() as session:
        for task in session.scalars(select(Task).order_by(Task.name)):
            count, last = session.execute(select(func.count(Job.id), func.max(Job.started_at))
                                          .where(Job.task_id == task.id)).one()
            table.add_row(task.name, str(count), str(last or "-")[:19], model_name(task.name))
    console.print(table)


def jobs(ctx: typer.Context, limit: int = typer.Option(20, min=1, help="Newest jobs to show.")) -> None:
    """List jobs: status, rounds committed, accuracy, message (`fedseek jobs resume ID` continues one)."""
    if ctx.invoked_subcommand:
        return
    from sqlalchemy import func, select

    from fedseek.platform.store.db import Job, Round

    from fedseek.config import JobConfig
    from fedseek.privacy.randomness import noise_label

    table = Table("job", "task", "scope", "status", "rounds", "accuracy", "DP noise", "started", "message",
                  title="jobs")
    with _session() as session:
        for job in session.scalars(select(Job).order_by(Job.id.desc()).limit(limit)):
            done = session.scalar(select(func.count(Round.id)).where(Round.job_id == job.id))
            acc = "-" if job.final_accuracy is None else f"{job.final_accuracy:.2%}"
            privacy = JobConfig.from_flat(json.loads(job.config_json)).privacy
            table.add_row(str(job.id), job.task.name, job.data_scope, job.status, f"{done}/{job.planned_rounds}",
                          acc, noise_label(privacy.enabled, privacy.reproducible_noise).split(" (")[0],
                          str(job.started_at)[:19], job.message[:120])
    console.print(table)


def resume(job_id: int = typer.Argument(..., help="The job to continue (see `fedseek jobs`)."),
           force: bool = typer.Option(False, help="Resume even if the process recorded as running it is alive."),
           verbose: bool = typer.Option(False, help="Show Flower/Ray logs.")) -> None:
    """Continue an interrupted (killed or failed) simulated job from its last committed round: same
    job id, adapter from that round's checkpoint, each round charged to the privacy ledger once."""
    from fedseek.platform.cli.console import RichReporter
    from fedseek.platform.store.checkpoints import CheckpointError
    from fedseek.platform.run.jobs import resume_job
    from fedseek.platform.store.resume import ResumeError
    from fedseek.platform.run.simulation import SimulationError
    from fedseek.quiet import quiet_environment

    quiet_environment()
    try:
        report = resume_job(job_id, RichReporter(console), verbose=verbose, force=force)
    except (ResumeError, CheckpointError, SimulationError) as err:
        fail(str(err))
    console.print(f"job {job_id} finished after resuming at round {report.get('resumed_after_round', 0) + 1}: "
                  f"accuracy {report['final_accuracy']:.2%}")


def versions(task: str = typer.Option(None, help="Task whose registered adapter versions to list "
                                      "(default: every task's).")) -> None:
    """List registered adapter versions (every task's, or one task's) with aliases and promotion decisions."""
    from mlflow.exceptions import MlflowException

    from fedseek.platform.mlflow.registry import model_name, task_models, versions as list_versions

    try:
        client = mlflow_client()
        names = [model_name(task)] if task else task_models(client)
        rows = [(name, r) for name in names for r in list_versions(client, name)]
    except MlflowException as err:
        fail(f"MLflow ({_settings().tracking_uri}): {str(err).splitlines()[0]}")
    if not rows:
        fail(f"no registered versions of task {task!r} (model {model_name(task)})" if task else
             "no registered adapter versions yet: every tracked `fedseek simulate` registers one", 1)
    table = Table("model", "version", "aliases", "accuracy", "epsilon", "promotion", "reason",
                  title=names[0] if task else "registered adapter versions")
    for name, r in rows:
        accuracy = "-" if r["accuracy"] is None else f"{float(r['accuracy']):.2%}"
        table.add_row(name, r["version"], ",".join(r["aliases"]), accuracy, r["epsilon"] or "-",
                      r["promotion"], r["reason"])
    console.print(table)


def promote(task: str = typer.Option(..., help="Task whose version to promote."),
            version: str = typer.Option(None, help="Version (default: the one aliased 'candidate').")) -> None:
    """Move `champion` to a version if it passes the gate (accuracy >= champion's, Forgetting/BWT
    within FEDSEEK_MAX_FORGETTING/FEDSEEK_MIN_BWT, epsilon within budget). Exit 1 if rejected."""
    from mlflow.exceptions import MlflowException

    from fedseek.platform.mlflow.registry import model_name, promote as run_gate

    settings, name = _settings(), model_name(task)
    try:
        client = mlflow_client()
        version = version or client.get_model_version_by_alias(name, "candidate").version
        ok, reason = run_gate(client, name, version, settings.database_url,
                              {"max_forgetting": settings.max_forgetting, "min_bwt": settings.min_bwt})
    except MlflowException as err:
        fail(f"{name}: {str(err).splitlines()[0]}")
    console.print(f"{name} v{version}: {'promoted to champion' if ok else 'not promoted'} ({reason})")
    if not ok:
        raise typer.Exit(code=1)


def dashboard(host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
              port: int = typer.Option(5000, help="Port of the MLflow UI.")) -> None:
    """Start the admin dashboard: the MLflow UI/server on the configured store (runs per task, the
    "privacy" experiment's budget view, the registry's versions with their promotion reasons)."""
    command = dashboard_command(_settings(), host, port)
    url = f"http://{host}:{port}"
    console.print(f"MLflow UI on {url}/#/experiments?workflowType=machine_learning (Ctrl-C stops it)\n"
                  f"  budget: the 'privacy' experiment; versions: {url}/#/models")
    # the server's background job runner (GenAI evaluation jobs) is not needed for the dashboard
    import signal

    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(command, env=env)
    signal.signal(signal.SIGTERM, lambda *_: server.terminate())  # stop the server with us
    try:
        code = server.wait()
    except KeyboardInterrupt:
        server.terminate()
        code = server.wait()
    raise typer.Exit(code=code)


def dashboard_command(settings, host: str, port: int) -> list[str]:
    settings.artifact_root.mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", settings.tracking_uri,
            "--artifacts-destination", str(settings.artifact_root.resolve()),
            "--host", host, "--port", str(port), "--workers", "1"]


def register(app: typer.Typer) -> None:
    """Add the platform commands to the `fedseek` app."""
    from fedseek.platform.cli import scheduler as scheduler_cli

    app.add_typer(db_app, name="db")
    app.add_typer(institutions_app, name="institutions")
    for command in (privacy, tasks, versions, promote, dashboard):
        app.command()(command)
    jobs_app = typer.Typer(help=jobs.__doc__, invoke_without_command=True, no_args_is_help=False)
    jobs_app.callback()(jobs)
    jobs_app.command("list")(jobs)
    jobs_app.command("resume")(resume)
    app.add_typer(jobs_app, name="jobs")
    scheduler_cli.register(schedule_app, scheduler_app)
    app.add_typer(schedule_app, name="schedule")
    app.add_typer(scheduler_app, name="scheduler")
