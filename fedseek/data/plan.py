"""What records a job reads: the load arguments every process derives the same split from, a
job's period slice with its validation hold-out, and the dataset identity the privacy ledger
charges (sha256 of the source files)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedseek.config import PERIOD_SEPARATOR, JobConfig


def data_arguments(job: JobConfig) -> dict:
    """Keyword arguments of `fedseek.data.tasks.load_federated_data` for this job: the server and
    every simulated institution derive the same split from them."""
    d = job.data
    user_pairs = d.causal_lm and bool(d.data or d.data_dir)  # shipped generative tasks carry their own
    return dict(task=d.task, institutions=job.federation.institutions, partition_scheme=d.partition,
                alpha=d.alpha, seed=job.federation.seed, data=d.data, data_dir=d.data_dir,
                test_data=d.test_data, text_column=d.prompt_column if user_pairs else d.text_column,
                label_column=d.label_column, max_train_rows=d.max_train_rows or None,
                period_column=d.period_column, max_test_rows=d.max_test_rows or None, encoding=d.encoding,
                response_column=d.response_column if user_pairs else None)


def federated_data(job: JobConfig):
    """The job's whole split (`load_federated_data` of `data_arguments`), read once per process:
    cached by the arguments and the files' content fingerprint, so an edited file is read again."""
    from fedseek.data.tasks import load_federated_data

    arguments = data_arguments(job)
    try:
        fingerprint = dataset_fingerprint(job)
    except ValueError:  # unreadable/unknown source: the loader names the file and line
        return load_federated_data(**arguments)
    return _load(tuple(sorted(arguments.items())), fingerprint)


@lru_cache(maxsize=8)
def _load(arguments: tuple, fingerprint: str):
    from fedseek.data.tasks import load_federated_data

    return load_federated_data(**dict(arguments))


def job_data(job: JobConfig, period: str | None = None):
    """The job's `FederatedData`; with periods, only the records of `period` (default: the job's
    own period(s)), split into train/validation per institution. Server and institutions derive
    the same split from the same config; in a simulation (`SPLIT_DIR`) each institution's part is
    also written to its own file, which that institution then reads alone (`institution_rows`)."""
    data = _job_data(job, period)
    if os.environ.get(SPLIT_DIR):
        _save_split(data, _split_dir(job if period is None else _with_period(job, period)))
    return data


def institution_rows(job: JobConfig, index: int):
    """(name, train rows, validation rows or None) of simulated institution `index` in the job's
    period(s): the file the coordinator wrote when it split the data, else derived as it does."""
    directory = _split_dir(job)
    if directory is not None and (directory / f"{index}.json").exists():
        saved = json.loads((directory / f"{index}.json").read_text())
        return saved["institution"], _rows(saved["train"]), _rows(saved["validation"]) if saved["validation"] else None
    data = job_data(job)
    return data.institutions[index], data.train[index], (data.validation or [None] * (index + 1))[index]


SPLIT_DIR = "FEDSEEK_SPLIT_DIR"  # set by the simulation runner: a directory private to the run


def _with_period(job: JobConfig, period: str) -> JobConfig:
    return dataclasses.replace(job, data=dataclasses.replace(job.data, period=period))


def _split_dir(job: JobConfig) -> Path | None:
    root = os.environ.get(SPLIT_DIR)
    if not root:
        return None
    identity = repr((job.data, job.federation.seed, job.federation.institutions))
    return Path(root) / hashlib.sha256(identity.encode()).hexdigest()[:16]


def _save_split(data, directory: Path) -> None:
    if directory.exists():
        return
    staging = directory.with_name(directory.name + f".{os.getpid()}.tmp")
    staging.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(data.institutions):
        held = data.validation[k] if data.validation else None
        (staging / f"{k}.json").write_text(json.dumps({"institution": name, "train": _fields(data.train[k]),
                                                       "validation": _fields(held) if held is not None else None}))
    try:
        staging.rename(directory)  # whole or not at all: a reader never sees a partial split
    except OSError:  # another process wrote the same split first
        shutil.rmtree(staging, ignore_errors=True)


def _fields(rows) -> dict:
    return {**dataclasses.asdict(rows), "labels": [int(x) for x in rows.labels]}


def _rows(fields: dict):
    from fedseek.data.loader import LabelledTexts

    return LabelledTexts(**{**fields, "labels": np.asarray(fields["labels"], dtype=np.int64)})


def _job_data(job: JobConfig, period: str | None):
    from fedseek.data.periods import plan_periods, split_validation

    data = federated_data(job)
    d = job.data
    if not d.periods:
        return data
    plan = {p.name: p for p in plan_periods(d.periods, _pooled(data), d.period_groups, d.period_freq)}
    wanted = [p for p in (period if period is not None else d.period).split(PERIOD_SEPARATOR) if p]
    unknown = [w for w in wanted if w not in plan]
    if unknown or not wanted:
        raise ValueError(f"period {unknown or wanted} is not one of {list(plan)}")
    chosen = [plan[w] for w in wanted]
    active = None if any(p.labels is None for p in chosen) else sorted(l for p in chosen for l in p.labels)

    def select(rows):
        index = np.unique(np.concatenate([p.selects(rows, d.periods, d.period_freq) for p in chosen]))
        return rows.subset(index.astype(int))

    train, validation = [], []
    for k, rows in enumerate(data.train):
        kept, held = split_validation(select(rows), d.validation_fraction, job.federation.seed + k)
        train.append(kept)
        validation.append(held)
    return dataclasses.replace(data, train=train, test=select(data.test), active_labels=active,
                               validation=validation)


def period_names(job: JobConfig) -> list[str]:
    """The ordered period names of the job's scheme."""
    from fedseek.data.periods import plan_periods

    data = federated_data(job)
    return [p.name for p in plan_periods(job.data.periods, _pooled(data), job.data.period_groups,
                                         job.data.period_freq)]


def _pooled(data):
    """All training rows of every institution (period keys are read off the whole pool)."""
    from fedseek.data.loader import LabelledTexts

    first = data.train[0]
    return LabelledTexts(sum((t.texts for t in data.train), []), np.concatenate([t.labels for t in data.train]),
                         first.label_names, sum((t.periods or [] for t in data.train), []) or None, first.source)


def data_scope(job: JobConfig, dataset: str) -> str:
    """The privacy-ledger scope key of `job` over the dataset with fingerprint `dataset`
    (`dataset_fingerprint` at the coordinator, the site's own file fingerprint at a site)."""
    from fedseek.privacy.ledger_math import DataScope

    # without a period scheme the job reads every record, whatever `period` says
    return DataScope(dataset, job.data.slicing_scheme, job.data.period_scope if job.data.periods else "all").key()


def dataset_fingerprint(job: JobConfig, deployed: bool = False) -> str:
    """Short sha256 of the records' source as the coordinator knows it: the files of the shipped
    task, the user's --data file or every --data-dir file (contents, not paths: an edited file is
    another dataset). `deployed`: the coordinator cannot read the sites' files, so the job's
    declared data identity (task and columns) stands in for them until the census carries each
    site's own fingerprint. The single place that decides a job's dataset identity."""
    d = job.data
    if deployed:
        declared = f"deployed:task={d.task};text={d.text_column};label={d.label_column}"
        return hashlib.sha256(declared.encode()).hexdigest()[:16]
    if d.data_dir:
        from fedseek.data.loader import find_data_files

        files = find_data_files(d.data_dir)
    elif d.data:
        files = [Path(d.data)]
    else:
        from fedseek.data.tasks import SHIPPED, SHIPPED_TASKS

        if d.task not in SHIPPED_TASKS:
            raise ValueError(f"data.task {d.task!r} is not a shipped task {list(SHIPPED_TASKS)}")
        # a generative task reads the same records as its classification twin: the same dataset (and budget)
        files = sorted(p for p in (SHIPPED / d.task.removesuffix("-gen")).iterdir() if p.is_file())
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + _file_sha256(str(path.resolve()), *_stamp(path)).encode())
    return digest.hexdigest()[:16]


def _stamp(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError as err:
        raise ValueError(f"data file {path}: cannot read it for the dataset fingerprint ({err.strerror})") from None
    return stat.st_size, stat.st_mtime_ns


@lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:  # size/mtime: re-hash an edited file
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
