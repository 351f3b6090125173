"""The ledger's composition rule, cross-checked against Google's dp_accounting (PLD and RDP)."""
from __future__ import annotations

import dp_accounting
import pytest

from fedseek.privacy.ledger_math import (DataScope, Release, histories_by_scope, institution_epsilon,
                                         projected_epsilon)

DELTA = 1e-5


def reference(history: list[tuple[float, float, int]], kind: str = "pld") -> float:
    accountant = dp_accounting.pld.PLDAccountant() if kind == "pld" else dp_accounting.rdp.RdpAccountant()
    for sigma, q, steps in history:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(DELTA)


def test_all_records_entries_compose_sequentially_over_jobs_and_fisher_passes():
    job1 = [Release("all", 1.1, 0.125, 12)] * 3
    fisher = [Release("all", 2.0, 0.05, 4)]
    job2 = [Release("all", 1.3, 0.125, 12)] * 2
    history = [(r.sigma, r.q, r.steps) for r in job1 + fisher + job2]
    assert institution_epsilon(job1 + fisher + job2, DELTA) == pytest.approx(reference(history), rel=0.01)
    assert institution_epsilon(job1 + fisher + job2, DELTA, "rdp") == pytest.approx(
        reference(history, "rdp"), rel=0.01)
    assert institution_epsilon(job1 + fisher + job2, DELTA) > institution_epsilon(job1, DELTA)


def scope(part: str, scheme: str = "years(column=,freq=)", dataset: str = "0123456789abcdef") -> str:
    return DataScope(dataset, scheme, part).key()


def test_disjoint_periods_compose_in_parallel_with_all_record_releases():
    early = [Release(scope("2005-2009"), 1.0, 0.125, 24)]
    late = [Release(scope("2010-2014"), 0.9, 0.125, 36)]
    shared = [Release(scope("all", "none"), 1.5, 0.1, 10)]  # a job over every record of the dataset
    releases = early + shared + late
    by_scope = histories_by_scope(releases)
    assert set(by_scope) == {scope("2005-2009"), scope("2010-2014")}
    expected = max(reference([(1.0, 0.125, 24), (1.5, 0.1, 10)]), reference([(1.5, 0.1, 10), (0.9, 0.125, 36)]))
    assert institution_epsilon(releases, DELTA) == pytest.approx(expected, rel=0.01)
    # parallel composition: far less than charging every release to every record
    sequential = reference([(1.0, 0.125, 24), (1.5, 0.1, 10), (0.9, 0.125, 36)])
    assert institution_epsilon(releases, DELTA) < sequential - 0.3
    # the same periods under another scheme, of another dataset, or as legacy bare names
    # (an older DB) may share records: sequential
    for other in (scope("2010-2014", "column(column=year,freq=)"), scope("2010-2014", dataset="fedcba9876543210")):
        assert institution_epsilon(early + shared + [Release(other, 0.9, 0.125, 36)], DELTA) == pytest.approx(
            sequential, rel=0.01)
    legacy = [Release("2005-2009", 1.0, 0.125, 24), Release("all", 1.5, 0.1, 10), Release("2010-2014", 0.9, 0.125, 36)]
    assert institution_epsilon(legacy, DELTA) == pytest.approx(sequential, rel=0.01)


def test_projection_adds_the_planned_job_and_empty_ledger_is_zero():
    spent = [Release("all", 1.0, 0.125, 60)]
    planned = [Release("all", 1.0, 0.125, 60)]
    assert projected_epsilon(spent, planned, DELTA) == pytest.approx(reference([(1.0, 0.125, 120)]), rel=0.01)
    assert institution_epsilon([], DELTA) == 0.0
