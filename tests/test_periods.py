"""Continual-learning periods: PubMedQA by year, banking77 by intent groups, user data by a column."""
from __future__ import annotations

import numpy as np
import pytest

from fedseek.config import JobConfig
from fedseek.data.loader import DataError, LabelledTexts
from fedseek.data.periods import plan_periods
from fedseek.data.plan import job_data, period_names


def _job(task: str, scheme: str, **data) -> JobConfig:
    job = JobConfig()
    job.data.task, job.data.periods = task, scheme
    for key, value in data.items():
        setattr(job.data, key, value)
    return job


def test_pubmedqa_years_are_ordered_and_rows_without_year_are_left_out():
    job = _job("pubmedqa", "years", validation_fraction=0.1)
    names = period_names(job)
    assert names == ["<=2004", "2005-2009", "2010-2013", "2014+"]
    seen = 0
    for name in names:
        data = job_data(job, name)
        assert data.active_labels is None  # domain-incremental: all of yes/no/maybe
        for rows in data.train + data.validation + [data.test]:
            years = [int(y) for y in rows.periods]
            low, high = {"<=2004": (0, 2004), "2005-2009": (2005, 2009), "2010-2013": (2010, 2013),
                         "2014+": (2014, 9999)}[name]
            assert all(low <= y <= high for y in years)
            seen += len(rows)
        assert not set(data.train[0].texts) & set(data.validation[0].texts)
    assert seen == 1000 - 58  # the 58 PubMedQA records without a YEAR belong to no period


def test_banking_intent_groups_are_disjoint_label_sets_with_masked_heads():
    job = _job("banking77", "intent-groups", period_groups=3)
    names = period_names(job)
    groups = [job_data(job, n) for n in names]
    labels = [set(g.active_labels) for g in groups]
    assert sum(len(s) for s in labels) == 77 and not (labels[0] & labels[1]) and not (labels[1] & labels[2])
    for data, active in zip(groups, labels):
        assert set(np.unique(data.test.labels)) <= active
        assert all(set(np.unique(t.labels)) <= active for t in data.train)
    joint = job_data(job, "|".join(names))
    assert sorted(joint.active_labels) == list(range(77)) and JobConfig().data.period_scope == "all"


def test_user_periods_from_a_date_column_by_quarter(tmp_path):
    rows = ["text,label,date"] + [f"note {i},{'ab'[i % 2]},2024-{1 + (i % 6):02d}-15" for i in range(60)]
    path = tmp_path / "notes.csv"
    path.write_text("\n".join(rows) + "\n")
    job = _job("", "column", data=str(path), period_column="date", period_freq="quarter")
    assert period_names(job) == ["2024Q1", "2024Q2"]
    first = job_data(job, "2024Q1")
    assert all(p[5:7] in ("01", "02", "03") for t in first.train for p in t.periods)


def test_bad_period_settings_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not one of"):
        plan_periods("seasons", LabelledTexts(["a"], np.array([0]), ["x"]))
    path = tmp_path / "one.csv"
    path.write_text("text,label,when\n" + "".join(f"t{i},a,2024-01-0{1 + i % 3}\n" for i in range(60)))
    with pytest.raises(DataError, match="at least 2 periods"):
        period_names(_job("", "column", data=str(path), period_column="when", period_freq="year"))
    with pytest.raises(DataError, match="not an ISO date"):
        period_names(_job("", "column", data=str(path), period_column="text", period_freq="year"))
    with pytest.raises(ValueError, match="is not one of"):
        job_data(_job("pubmedqa", "years"), "1990s")
