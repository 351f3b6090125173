"""Round checkpoints of a job's global adapter, written before the round is committed.

A round is committed by ONE database transaction (the round row, its ledger entries and the
checkpoint's SHA-256); the checkpoint file is written and fsynced first, under a temporary name,
then renamed. A crash before the commit leaves at most an orphan file the next attempt overwrites;
a checkpoint only counts when its digest matches a committed round, so DB and checkpoint agree.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np


class CheckpointError(RuntimeError):
    """A committed round's checkpoint is missing or does not match its recorded digest."""


def checkpoint_path(root: Path, job_id: int, round_number: int) -> Path:
    return Path(root) / f"job-{job_id:06d}" / f"round-{round_number:04d}.safetensors"


def save_checkpoint(path: Path, tensors: dict[str, np.ndarray]) -> str:
    """Write `tensors` atomically (temp file, fsync, rename, fsync dir); return the file's SHA-256."""
    from safetensors.numpy import save

    data = save({k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return hashlib.sha256(data).hexdigest()


def load_checkpoint(path: Path, sha256: str | None) -> dict[str, np.ndarray]:
    """The tensors of a committed round, verified against the digest its DB row recorded."""
    from safetensors.numpy import load

    if not sha256:
        raise CheckpointError(f"{path}: its round was committed without a checkpoint digest "
                              "(a job started before checkpoints existed cannot be resumed)")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint of a committed round is missing")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise CheckpointError(f"{path}: checkpoint does not match the digest committed with its round "
                              f"(expected {sha256[:12]}…); it was modified or is corrupt")
    return load(data)


def crash_point(name: str) -> None:
    """Fault injection for the reliability tests: `FEDSEEK_CRASH_AT=<name>` kills the process here
    (as SIGKILL would: no cleanup, no exception handlers)."""
    if os.environ.get("FEDSEEK_CRASH_AT") == name:
        os._exit(137)
