"""PlatformReporter: records a federated job in the platform DB (job, rounds committed atomically
with their ledger entries, adapter version) and in MLflow (through the outbox), registers the
adapter and gates promotion. A `fedseek.aggregator.rounds.Reporter`: its `should_continue()` says
no when the next round would take an institution over its privacy budget."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fedseek.platform.mlflow.registry import model_name, version_tags
from fedseek.platform.mlflow.tracking import Outbox, flush_all
from fedseek.aggregator.period import GENERATION_METRICS
from fedseek.platform.run import job_tracking
from fedseek.platform.store import ledger
from fedseek.platform.store.checkpoints import checkpoint_path, crash_point, save_checkpoint
from fedseek.platform.store.db import (AdapterVersion, Job, Period, get_or_create_task, session_scope,
                                 utcnow)
from fedseek.platform.store.resume import owner
from fedseek.platform.store.settings import PlatformSettings, load_settings
from fedseek.privacy.ledger_math import DataScope


def data_scope(job, runner: str = "simulate") -> str:
    """The ledger scope key of `job`: its dataset's fingerprint, period scheme and slice
    (`fedseek.config.data_scope`); deployed jobs use the declared data identity."""
    from fedseek.data.plan import data_scope as scope_key, dataset_fingerprint

    return scope_key(job, dataset_fingerprint(job, deployed=runner == "deploy"))


def adapter_sha256(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(directory).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def task_name(job, data_task: str | None = None) -> str:
    if data_task:
        return data_task
    if job.data.data:
        return Path(job.data.data).stem
    return Path(job.data.data_dir).name if job.data.data_dir else job.data.task


class PlatformReporter:
    """Each start..finish cycle is one platform job (a continual-learning run calls it once per
    period): its own DB row, pre-flight check, MLflow parent run and registered version."""

    def __init__(self, inner=None, settings: PlatformSettings | None = None, runner: str = "simulate"):
        self.inner, self.settings, self.runner = inner, settings or load_settings(), runner
        self.db = self.settings.database_url
        self.job_id: int | None = None
        self.finished = False
        self.outbox: Outbox | None = None
        self.steps_seen: dict[tuple[str, str], int] = {}
        self.rows: list[dict] = []
        self.resumed = None  # the ResumePoint of a resumed job
        self.checkpoint_sha256: dict[int, str] = {}  # round -> digest of its written checkpoint
        self.scope = "all"  # the current job's ledger scope key (set by preflight/attach)
        self.preflighted: dict | None = None  # the flat config the current job row was checked for
        self.stop_reason = ""  # set when the next round would exceed a budget (should_continue)

    # -- before Ray starts -------------------------------------------------------------------
    def preflight(self, job, data) -> list[ledger.Projection]:
        """Record the job and refuse it (BudgetExceeded, job row 'refused') if any institution's
        projected epsilon exceeds its budget. A job row checked but not started yet (the caller's
        early pre-flight of a continual run's first job) is re-checked for `job` in place."""
        scope, plans = data_scope(job, self.runner), {}
        if job.privacy.enabled:
            plans = {n: ledger.planned_releases(job, len(t), scope) for n, t in zip(data.institutions, data.train)}
        period = DataScope.parse(scope).slice
        with session_scope(self.db) as session:
            projections = ledger.project(session, plans, self.settings.default_epsilon_max)
            task = get_or_create_task(session, data.task)
            if period != "all" and not any(p.name == period for p in task.periods):
                session.add(Period(task_id=task.id, name=period, position=len(task.periods)))
            row = session.get(Job, self.job_id) if self.job_id is not None and not self.finished else None
            if row is None:
                row = Job(task_id=task.id, status="running", planned_rounds=0, config_json="{}",
                          runner=self.runner, owner=owner())
                session.add(row)
            row.data_scope, row.config_json = scope, json.dumps(job.to_flat())
            row.planned_rounds = job.federation.rounds
            session.flush()
            self.job_id, self.finished, self.scope, self.preflighted = row.id, False, scope, job.to_flat()
        try:
            ledger.check_budget(projections)
        except ledger.BudgetExceeded as refusal:
            self._close("refused", str(refusal))
            self.finished = True  # nothing of it ran: a later fail() must not relabel it
            raise
        return projections

    # -- Reporter protocol ----------------------------------------------------------------------
    def start(self, job, data, initial) -> None:
        self.stop_reason = ""
        if self.resumed is not None:
            return self._restart(job, data, initial)
        if self.job_id is None or self.finished or self.preflighted != job.to_flat():
            self.preflight(job, data)  # not pre-flighted yet (or for another config), or the next job
        self.job, self.task = job, data.task
        self.steps_seen, self.rows = {}, []
        self.outbox = Outbox(self.settings.outbox_dir, f"job-{self.job_id:06d}")
        self._flush()  # older journals first, so versions keep their order
        job_tracking.open_runs(self.outbox, job, data, self.job_id, self.db, self.scope)
        self.outbox.append("metrics", key="job", step=0,
                           metrics=job_tracking.finite({k: v for k, v in initial.items()
                                                        if k in ("accuracy", "loss", *GENERATION_METRICS)}))
        self._flush()
        if self.inner:
            self.inner.start(job, data, initial)

    def attach(self, point) -> None:
        """Continue the interrupted job of `point` (a resume.ResumePoint) instead of a new one."""
        self.resumed, self.job_id, self.finished = point, point.job_id, False
        self.steps_seen, self.rows = dict(point.steps), list(point.rows)
        with session_scope(self.db) as session:
            row = session.get(Job, point.job_id)
            self.scope = row.data_scope  # the scope it was charged under, even if a file changed since
            row.status, row.owner, row.finished_at = "running", owner(), None
            row.message = f"resumed after round {point.committed}"

    def _restart(self, job, data, initial) -> None:
        """The resumed job's MLflow runs: the same ones, reopened; rounds committed but not yet
        journalled (a crash right after the commit) are journalled from the DB now."""
        self.job, self.task = job, data.task
        self.outbox = Outbox(self.settings.outbox_dir, f"job-{self.job_id:06d}")
        ops = self.outbox.ops()
        if any(op["op"] == "run" for op in ops):  # its journal is still here
            self.outbox.append("reopen", keys=["job"] + [f"institution:{n}" for n in data.institutions])
            logged = {op["step"] for op in ops if op["op"] == "metrics" and op["key"] == "job"}
            for row in self.rows:
                if row["round"] not in logged:
                    job_tracking.round_metrics(self.outbox, row)
        elif self.resumed.mlflow_run_id:  # journal sent and removed (a failed job): every round is in MLflow
            self.outbox.append("attach", key="job", run_id=self.resumed.mlflow_run_id)
        else:
            job_tracking.open_runs(self.outbox, job, data, self.job_id, self.db, self.scope)
            for row in self.rows:
                job_tracking.round_metrics(self.outbox, row)
        self._flush()
        if self.inner:
            self.inner.start(job, data, initial)

    def checkpoint(self, round_number: int, tensors: dict) -> None:
        """Write the global adapter after `round_number` (before the round is committed)."""
        path = checkpoint_path(self.settings.checkpoint_dir, self.job_id, round_number)
        self.checkpoint_sha256[round_number] = save_checkpoint(path, tensors)
        crash_point("after-checkpoint")

    def round(self, row: dict) -> None:
        entries = ledger.round_entries(row, self.steps_seen) if self.job.privacy.enabled else []
        with session_scope(self.db) as session:  # the round, its ledger entries and checkpoint digest
            ledger.commit_round(session, self.job_id, row, entries, self.scope,
                                self.job.privacy.clip_norm, self.settings.default_epsilon_max,
                                self.checkpoint_sha256.get(int(row["round"])))
            session.flush()
            crash_point("in-commit")  # everything written, not yet committed
        crash_point("after-commit")
        self.rows.append(row)
        job_tracking.round_metrics(self.outbox, row)
        self._flush()
        if self.inner:
            self.inner.round(row)
        if int(row["round"]) < self.job.federation.rounds and entries:
            with session_scope(self.db) as session:
                self.stop_reason = ledger.next_round_refusal(session, entries, self.scope, len(self.rows))

    def should_continue(self) -> bool:
        """False once the next round would exceed a budget: the job ends after the committed round."""
        return not self.stop_reason

    def finish(self, report: dict) -> None:
        out = Path(report["adapter_dir"]).parent
        stopped = report.get("stopped")
        with session_scope(self.db) as session:
            job = session.get(Job, self.job_id)
            job.final_accuracy = report["final_accuracy"]
            version = AdapterVersion(job_id=self.job_id, task_id=job.task_id, path=report["adapter_dir"],
                                     sha256=adapter_sha256(Path(report["adapter_dir"])))
            session.add(version)
            session.flush()
            version_id = version.id
            if self.job.privacy.enabled:  # the DP Fisher passes that followed the rounds
                fisher = [ledger.fisher_entry(e) for e in report.get("fisher") or [] if "fisher_steps" in e]
                ledger.add_entries(session, self.job_id, len(self.rows), fisher, self.scope,
                                   self.job.privacy.clip_norm, self.settings.default_epsilon_max)
        job_tracking.log_artifacts(self.outbox, report, out, self.db)
        job_tracking.privacy_summary(self.outbox, report, self.db, self.job_id, self.scope)
        tags = version_tags(report, self.job_id, self.scope)
        self.outbox.append("register", key="job", model=model_name(self.task), artifact_path="adapter",
                           tags=tags, db_url=self.db, adapter_version_id=version_id)
        if self.settings.auto_promote and not stopped:
            self.outbox.append("promote", key="job", model=model_name(self.task), db_url=self.db,
                               limits={"max_forgetting": self.settings.max_forgetting,
                                       "min_bwt": self.settings.min_bwt})
        for key in [f"institution:{n}" for n in report["institutions"]] + ["job"]:
            self.outbox.append("end", key=key, status="FINISHED")
        self.outbox.append("close")
        self._close("stopped" if stopped else "finished", stopped or "")
        self.finished = True
        self._flush()
        if self.inner:
            self.inner.finish(report)

    # -- helpers ----------------------------------------------------------------------------------
    def charge_counts(self, job, entries: list[dict]) -> None:
        """Charge noised record counts (`evaluate.validation` replies; `ledger.count_entries`) on
        `job`'s records to the ledger, with the current platform job."""
        scope = data_scope(job, self.runner)
        with session_scope(self.db) as session:
            ledger.add_entries(session, self.job_id, len(self.rows), ledger.count_entries(entries, scope), scope,
                               0.0, self.settings.default_epsilon_max)

    def fail(self, message: str) -> None:
        """Mark the job failed (the federation raised); its committed rounds stay in the ledger.
        A job already closed (finished, stopped or refused) keeps its status."""
        if self.finished:
            return
        if self.job_id is not None:
            self._close("failed", message)
        if self.outbox is not None:
            self.outbox.append("tags", key="job", tags={"fedseek.error": message[:500]})
            job = getattr(self, "job", None)
            if self.rows and job is not None and job.privacy.enabled:  # its committed rounds were charged
                charged = [c["institution"] for c in self.rows[-1].get("clients", [])]
                job_tracking.budget(self.outbox, self.db, charged, self.job_id)
            self.outbox.append("end", key="job", status="FAILED")
            self.outbox.append("close")
            self._flush()

    def _close(self, status: str, message: str) -> None:
        with session_scope(self.db) as session:
            job = session.get(Job, self.job_id)
            job.status, job.message, job.finished_at = status, message, utcnow()

    def _flush(self) -> None:
        flush_all(self.settings.outbox_dir, self.settings.tracking_uri, self.settings.artifact_root)
