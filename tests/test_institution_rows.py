"""A simulated institution reads only its own records (issue 17): when the coordinator splits a job's
data in a simulation (`FEDSEEK_SPLIT_DIR`), each institution's part — period slice and validation
hold-out included — goes to its own file, and `institution_rows` returns exactly the rows the
coordinator's split holds without loading or partitioning the data set again."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from fedseek.config import JobConfig
from fedseek.data import plan
from fedseek.data.plan import SPLIT_DIR, institution_rows, job_data


def jobs() -> list[JobConfig]:
    plain = JobConfig()
    plain.data.max_train_rows = 900
    periods = JobConfig()
    periods.data.periods, periods.data.period_groups, periods.data.period = "intent-groups", 2, "labels 39-76"
    generative = JobConfig()
    generative.data.task, generative.data.objective = "pubmedqa-gen", "causal-lm"
    return [plain, periods, generative]


def same(a, b) -> bool:
    return (a.texts == b.texts and np.array_equal(a.labels, b.labels) and a.labels.dtype == b.labels.dtype
            and a.label_names == b.label_names and a.periods == b.periods and a.responses == b.responses)


@pytest.mark.parametrize("job", jobs(), ids=["plain", "periods", "causal-lm"])
def test_an_institution_reads_its_own_file_and_gets_the_coordinators_rows(job, tmp_path, monkeypatch):
    monkeypatch.setenv(SPLIT_DIR, str(tmp_path))
    data = job_data(job)  # the coordinator's split, saved one file per institution
    files = sorted(p.name for p in tmp_path.glob("*/*.json"))
    assert files == [f"{k}.json" for k in range(job.federation.institutions)]
    saved = json.loads(next(tmp_path.glob("*/1.json")).read_text())
    assert saved["institution"] == data.institutions[1] and len(saved["train"]["texts"]) == len(data.train[1])

    def no_whole_dataset(*_args, **_kwargs):
        raise AssertionError("the institution loaded the whole data set")

    monkeypatch.setattr(plan, "federated_data", no_whole_dataset)
    received = JobConfig.from_flat(job.to_flat())  # the job as an institution reads it off a message
    for k in range(job.federation.institutions):
        name, train, validation = institution_rows(received, k)
        assert name == data.institutions[k] and same(train, data.train[k])
        held = data.validation[k] if data.validation else None
        assert (validation is None) == (held is None) and (held is None or same(validation, held))


def test_the_split_of_another_period_or_seed_is_not_read(tmp_path, monkeypatch):
    monkeypatch.setenv(SPLIT_DIR, str(tmp_path))
    periods = jobs()[1]
    first = job_data(periods)
    other = dataclasses.replace(periods, data=dataclasses.replace(periods.data, period="labels 0-38"))
    _, train, _ = institution_rows(other, 0)  # no file for it yet: derived (and now saved) like the coordinator
    assert not same(train, first.train[0]) and same(train, job_data(other).train[0])
    assert len(list(tmp_path.iterdir())) == 2


def test_without_a_split_directory_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv(SPLIT_DIR, raising=False)
    monkeypatch.chdir(tmp_path)
    job = jobs()[0]
    name, train, _ = institution_rows(job, 2)
    assert name == job_data(job).institutions[2] and list(tmp_path.iterdir()) == []


def test_a_killed_simulations_split_directory_is_removed_by_the_next_one(tmp_path, monkeypatch):
    """A `simulate` killed before its clean-up leaves its institutions' records in its split
    directory; the next `simulate` removes every such directory whose process is gone and keeps
    those of running simulations (and anything not named as a split directory)."""
    import subprocess
    import sys
    import tempfile

    from fedseek.platform.run.simulation import SPLIT_PREFIX, remove_orphaned_splits

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process id that no longer runs: the killed simulation's
    orphaned, running = tmp_path / f"{SPLIT_PREFIX}{gone.pid}-abc", tmp_path / f"{SPLIT_PREFIX}{os.getpid()}-def"
    other = tmp_path / f"{SPLIT_PREFIX}notapid"
    for directory in (orphaned, running, other):
        directory.mkdir()
        (directory / "0.json").write_text("[]")
    assert remove_orphaned_splits() == [orphaned]
    assert not orphaned.exists() and (running / "0.json").is_file() and other.is_dir()
