"""`fedseek jobs resume`: continue a job whose process died after round k was committed.

The job's config, its committed rounds and ledger entries come from the platform DB, the global
adapter from round k's checkpoint (verified against the digest committed with the round). The
resumed job trains rounds k+1..R as the same job id: round numbers, learning-rate schedule, seeds
and the privacy accountant continue where they were, and each round is charged once.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field

import numpy as np

from fedseek.config import JobConfig
from fedseek.platform.store.checkpoints import checkpoint_path, load_checkpoint

RESUMABLE = ("running", "failed")


class ResumeError(ValueError):
    """The job cannot be resumed (unknown, ended, still running, or its checkpoint is unusable)."""


@dataclass
class ResumePoint:
    job_id: int
    job: JobConfig
    runner: str
    committed: int  # rounds committed (k)
    tensors: dict[str, np.ndarray] | None  # global adapter after round k (None when k = 0)
    rows: list[dict] = field(default_factory=list)  # committed rounds as report rows
    steps: dict[tuple[str, str], int] = field(default_factory=dict)  # (institution, kind) -> steps charged
    mlflow_run_id: str | None = None


def owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive_elsewhere(owner_id: str | None) -> bool:
    """Whether the process recorded as running the job is alive on this host (and is not us)."""
    if not owner_id or ":" not in owner_id:
        return False
    host, _, pid = owner_id.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    return process_alive(int(pid))


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_resume_point(settings, job_id: int, force: bool = False) -> ResumePoint:
    from sqlalchemy import select

    from fedseek.platform.store.db import Institution, Job, LedgerEntry, Round, session_scope

    with session_scope(settings.database_url) as session:
        row = session.get(Job, job_id)
        if row is None:
            raise ResumeError(f"job {job_id}: no such job (see `fedseek jobs`)")
        if row.status not in RESUMABLE:
            raise ResumeError(f"job {job_id} is {row.status}: only a running (interrupted) or failed job "
                              "can be resumed")
        if not force and row.status == "running" and _alive_elsewhere(row.owner):
            raise ResumeError(f"job {job_id} is still running (process {row.owner}); stop it first, or "
                              "pass --force if that process is not this job")
        job = JobConfig.from_flat(json.loads(row.config_json))
        if job.data.periods:
            raise ResumeError(f"job {job_id} is one period of a continual-learning run: resume is for "
                              "single jobs; re-run the remaining periods")
        rounds = session.scalars(select(Round).filter_by(job_id=job_id).order_by(Round.number)).all()
        numbers = [r.number for r in rounds]
        if numbers != list(range(1, len(numbers) + 1)):
            raise ResumeError(f"job {job_id}: committed rounds {numbers} are not 1..k")
        entries = session.execute(select(LedgerEntry, Institution.name).join(Institution)
                                  .where(LedgerEntry.job_id == job_id).order_by(LedgerEntry.id)).all()
        steps: dict[tuple[str, str], int] = {}
        per_round: dict[int, list[dict]] = {}
        for entry, name in entries:
            if entry.kind == "train":
                steps[(name, "train")] = steps.get((name, "train"), 0) + entry.steps
            per_round.setdefault(entry.round_number, []).append({
                "institution": name, "epsilon": entry.epsilon_after, "epsilon_rdp": entry.epsilon_rdp_after,
                "delta": entry.delta, "noise_multiplier": entry.sigma, "sample_rate": entry.q,
                "steps": steps.get((name, "train"), 0), "bytes_up": 0})
        rows = [{"round": r.number, "accuracy": r.accuracy, "loss": r.loss,
                 "train_loss": r.train_loss if r.train_loss is not None else float("nan"),
                 "bytes_up": r.bytes_up, "epsilon": {c["institution"]: c["epsilon"] for c in per_round.get(r.number, [])},
                 "elapsed_s": None, "clients": per_round.get(r.number, []), "committed_at": str(r.committed_at)}
                for r in rounds]
        k = len(rounds)
        tensors = (load_checkpoint(checkpoint_path(settings.checkpoint_dir, job_id, k), rounds[-1].checkpoint_sha256)
                   if k else None)
        return ResumePoint(job_id, job, row.runner, k, tensors, rows, steps, row.mlflow_run_id)
