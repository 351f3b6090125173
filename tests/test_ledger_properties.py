"""Property tests (hypothesis) of the privacy ledger:

- under the pre-flight rule (`ledger.project` + `check_budget`, then the job's rounds committed
  with `ledger.add_entries`), no sequence of jobs — any institutions, σ, q, steps, rounds, data
  scopes (whole records or disjoint periods) — leaves an institution past its ε budget, on a real
  SQLite platform DB; refused jobs charge nothing;
- the institution's ε never decreases as releases are added, so checking the projected end of a
  job also bounds every round before it;
- releases of different slicing schemes (or datasets) compose sequentially, different slices of one
  scheme over one dataset in parallel;
- ε of random mixed-σ/q histories agrees with Google's dp_accounting (PLD) within 1 %
  (test_privacy.py and test_ledger_math.py check fixed histories)."""
from __future__ import annotations

import shutil

import dp_accounting
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from fedseek.config import JobConfig
from fedseek.platform.store import ledger
from fedseek.platform.store.db import Institution, Job, LedgerEntry, get_or_create_task, session_scope
from fedseek.privacy.accountant import epsilon
from fedseek.privacy.ledger_math import DataScope, Release, institution_epsilon

DELTA = 1e-5
BUDGET = 3.0
DATASET = "0123456789abcdef"
GROUPS3 = [DataScope(DATASET, "intent-groups(groups=3,labels=label)", p).key()
           for p in ("labels 0-25", "labels 26-51", "labels 52-76")]
GROUPS2 = [DataScope(DATASET, "intent-groups(groups=2,labels=label)", p).key() for p in ("labels 0-38", "labels 39-76")]
SCOPES = ("all", "2023", "2024", *GROUPS3, *GROUPS2)  # legacy keys, and two overlapping schemes of one dataset
SITES = ("bank_a", "bank_b")

jobs = st.lists(st.fixed_dictionaries({
    "sites": st.sampled_from([SITES[:1], SITES[1:], SITES]),
    "scope": st.sampled_from(SCOPES),
    "sigma": st.floats(0.6, 4.0),
    "q": st.sampled_from([0.05, 0.125, 0.25]),
    "steps": st.integers(1, 30),
    "rounds": st.integers(1, 2),
}), min_size=1, max_size=4)


@pytest.fixture(scope="module")
def template_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("ledger") / "template.db"
    with session_scope(f"sqlite:///{path}"):
        pass  # migrated
    return path


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sequence=jobs)
def test_no_sequence_of_jobs_exceeds_a_budget_under_the_preflight_rule(sequence, template_db, tmp_path_factory):
    path = tmp_path_factory.mktemp("db") / "fedseek.db"
    shutil.copy(template_db, path)
    url = f"sqlite:///{path}"
    accepted = 0
    for number, spec in enumerate(sequence, start=1):
        job = JobConfig()
        job.privacy.noise_multiplier, job.optim.batch_fraction = spec["sigma"], spec["q"]
        job.optim.local_steps, job.federation.rounds = spec["steps"], spec["rounds"]
        with session_scope(url) as session:
            plans = {site: ledger.planned_releases(job, 5000, spec["scope"]) for site in spec["sites"]}
            before = {site: _spent(session, site) for site in SITES}
            projections = ledger.project(session, plans, BUDGET)
            try:
                ledger.check_budget(projections)
            except ledger.BudgetExceeded as refusal:
                assert any(p.projected > BUDGET for p in projections), refusal
                continue
        accepted += 1
        with session_scope(url) as session:
            row = Job(task_id=get_or_create_task(session, "t").id, status="running", config_json="{}",
                      planned_rounds=spec["rounds"], data_scope=spec["scope"])
            session.add(row)
            session.flush()
            for rnd in range(1, spec["rounds"] + 1):  # each round: its own commit, as the reporter does
                entries = [{"institution": site, "kind": "train", "sigma": spec["sigma"], "q": spec["q"],
                            "steps": spec["steps"], "delta": plans[site][1]} for site in spec["sites"]]
                ledger.add_entries(session, row.id, rnd, entries, spec["scope"], 1.0, BUDGET)
                for site in spec["sites"]:
                    assert _spent(session, site) <= BUDGET + 1e-9  # every round, not only the end
        with session_scope(url) as session:
            for p in projections:  # what was projected is what was charged
                assert _spent(session, p.institution) == pytest.approx(p.projected, rel=1e-9)
            for site in set(SITES) - set(spec["sites"]):
                assert _spent(session, site) == before[site]
    with session_scope(url) as session:
        for site in SITES:
            spent = _spent(session, site)
            assert spent <= BUDGET + 1e-9
            last = session.scalars(select(LedgerEntry).join(Institution).filter(Institution.name == site)
                                   .order_by(LedgerEntry.id.desc())).first()
            if last is not None:
                assert last.epsilon_after == pytest.approx(spent, rel=1e-9)


def _spent(session, name: str) -> float:
    row = session.scalars(select(Institution).filter_by(name=name)).one_or_none()
    return 0.0 if row is None else ledger.spent(session, row)


releases = st.lists(st.builds(Release, st.sampled_from(SCOPES), st.floats(0.7, 3.0),
                              st.sampled_from([0.02, 0.1, 0.25]), st.integers(1, 40)), min_size=1, max_size=4)


@settings(max_examples=8, deadline=None)
@given(history=releases)
def test_epsilon_never_decreases_as_releases_are_added(history):
    values = [institution_epsilon(history[:n], DELTA) for n in range(len(history) + 1)]
    assert values[0] == 0.0
    assert all(b >= a - 1e-3 for a, b in zip(values, values[1:])), values  # PRV error bound 1e-3


def pld(history) -> float:
    accountant = dp_accounting.pld.PLDAccountant()
    for sigma, q, steps in history:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(DELTA)


mixed = st.lists(st.tuples(st.floats(0.8, 3.0), st.sampled_from([0.01, 0.05, 0.125, 0.3]), st.integers(1, 40)),
                 min_size=2, max_size=3).filter(lambda h: len({(s, q) for s, q, _ in h}) > 1)


@settings(max_examples=6, deadline=None)
@given(history=mixed)
def test_mixed_sigma_q_histories_match_dp_accounting_within_one_percent(history):
    reference = pld(history)
    assert epsilon(history, DELTA) == pytest.approx(reference, rel=0.01, abs=1e-3)


one_release = st.tuples(st.floats(0.8, 3.0), st.sampled_from([0.05, 0.125]), st.integers(1, 30))
SCHEMES = [f"intent-groups(groups={g},labels=label)" for g in (2, 3, 4)] + ["column(column=date,freq=year)"]


@settings(max_examples=6, deadline=None)
@given(history=st.lists(one_release, min_size=2, max_size=4), data=st.data())
def test_overlapping_schemes_compose_sequentially_one_scheme_in_parallel(history, data):
    # each release from another scheme or dataset (any slice names): the full sequential epsilon
    slices = data.draw(st.lists(st.sampled_from(["labels 0-25", "labels 0-38", "2024", "all"]),
                                min_size=len(history), max_size=len(history)))
    datasets = data.draw(st.lists(st.sampled_from([DATASET, "fedcba9876543210"]), min_size=len(history),
                                  max_size=len(history)))
    mixed = [Release(DataScope(d, SCHEMES[i % len(SCHEMES)] if d == DATASET else SCHEMES[0], p).key(), *h)
             for i, (h, p, d) in enumerate(zip(history, slices, datasets))]
    if len({(DataScope.parse(r.scope).dataset, DataScope.parse(r.scope).scheme) for r in mixed}) == len(mixed):
        assert institution_epsilon(mixed, DELTA) == pytest.approx(epsilon(history, DELTA), rel=1e-6)
    # one scheme over one dataset, a different slice each: the worst single slice
    disjoint = [Release(DataScope(DATASET, SCHEMES[1], f"period {i}").key(), *h) for i, h in enumerate(history)]
    assert institution_epsilon(disjoint, DELTA) == pytest.approx(max(epsilon([h], DELTA) for h in history), rel=1e-6)
    # and never above the fully sequential history, never below any one release
    assert max(epsilon([h], DELTA) for h in history) - 1e-3 <= institution_epsilon(mixed, DELTA) \
        <= epsilon(history, DELTA) + 1e-3
