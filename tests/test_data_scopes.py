"""Scopes that cannot lie: a ledger scope names the dataset (a fingerprint of its files), the
period scheme with its parameters and the slice; only slices of ONE scheme over ONE dataset
compose in parallel. The attacker is the coordinator's operator re-slicing the same records
(`--period-groups 3` then `2`, `year` then `quarter`, an edited file) to spend a budget twice."""
from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace

import dp_accounting
import pytest
from sqlalchemy import create_engine, inspect, text

from fedseek.config import JobConfig
from fedseek.data.plan import data_scope, dataset_fingerprint
from fedseek.platform.store import ledger
from fedseek.platform.store.db import session_scope, upgrade
from fedseek.privacy.accountant import epsilon
from fedseek.privacy.ledger_math import DataScope, Release, institution_epsilon

DELTA = 1e-5
T = (0.8, 0.1, 20)  # one job's release: sigma, q, steps


def pld(history) -> float:
    return _pld(tuple(history))


@lru_cache(maxsize=None)
def _pld(history) -> float:
    accountant = dp_accounting.pld.PLDAccountant()
    for sigma, q, steps in history:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(DELTA)


def banking(groups: int, period: str) -> JobConfig:
    job = JobConfig()
    job.data.periods, job.data.period_groups, job.data.period = "intent-groups", groups, period
    return job


def dated(path, freq: str, period: str) -> JobConfig:
    job = JobConfig()
    job.data.data, job.data.period_column, job.data.periods = str(path), "date", "column"
    job.data.period_freq, job.data.period = freq, period
    return job


def key(job: JobConfig) -> str:
    return data_scope(job, dataset_fingerprint(job))


def test_period_groups_three_then_two_compose_sequentially():
    # "labels 0-25" (3 groups) and "labels 0-38" (2 groups) share 26 labels' records
    releases = [Release(key(banking(3, "labels 0-25")), *T), Release(key(banking(2, "labels 0-38")), *T)]
    sequential = pld([T, T])
    assert institution_epsilon(releases, DELTA) == pytest.approx(sequential, rel=0.01)
    assert institution_epsilon(releases, DELTA) > epsilon([T], DELTA) + 0.5  # not the parallel value


def test_same_scheme_disjoint_periods_still_compose_in_parallel():
    releases = [Release(key(banking(3, p)), *T) for p in ("labels 0-25", "labels 26-51", "labels 52-76")]
    assert institution_epsilon(releases, DELTA) == pytest.approx(pld([T]), rel=0.01)
    joint = banking(3, "labels 0-25|labels 26-51")  # several periods at once: "all" of the scheme
    assert DataScope.parse(key(joint)).slice == "all"
    assert institution_epsilon(releases + [Release(key(joint), *T)], DELTA) == pytest.approx(pld([T, T]), rel=0.01)


@pytest.fixture
def dates_csv(tmp_path):
    path = tmp_path / "records.csv"
    rows = [f"text {i},{'ab'[i % 2]},2024-{1 + i % 12:02d}-15" for i in range(48)]
    path.write_text("text,label,date\n" + "\n".join(rows) + "\n")
    return path


def test_year_and_quarter_slices_of_one_file_compose_sequentially(dates_csv):
    year, quarter = dated(dates_csv, "year", "2024"), dated(dates_csv, "quarter", "2024Q2")
    releases = [Release(key(year), *T), Release(key(quarter), *T)]
    assert institution_epsilon(releases, DELTA) == pytest.approx(pld([T, T]), rel=0.01)
    quarters = [Release(key(dated(dates_csv, "quarter", f"2024Q{i}")), *T) for i in (1, 2, 3)]
    assert institution_epsilon(quarters, DELTA) == pytest.approx(pld([T]), rel=0.01)


def test_an_edited_file_is_another_dataset(dates_csv):
    before = key(dated(dates_csv, "quarter", "2024Q1"))
    dates_csv.write_text(dates_csv.read_text().replace("text 3,", "text 3 corrected,"))
    after = key(dated(dates_csv, "quarter", "2024Q2"))
    assert DataScope.parse(before).dataset != DataScope.parse(after).dataset
    assert institution_epsilon([Release(before, *T), Release(after, *T)], DELTA) == pytest.approx(
        pld([T, T]), rel=0.01)
    other = JobConfig()
    other.data.task = "medical_abstracts"
    assert dataset_fingerprint(other) != dataset_fingerprint(JobConfig())
    assert dataset_fingerprint(JobConfig()) == dataset_fingerprint(JobConfig())  # stable, 16 hex
    assert len(dataset_fingerprint(JobConfig())) == 16


def test_legacy_keys_parse_as_unknown_and_compose_sequentially_with_everything():
    assert DataScope.parse("all") == DataScope("", "", "all")
    assert DataScope.parse("2005-2009") == DataScope("", "", "2005-2009")
    legacy = [Release("2005-2009", *T), Release("2010-2013", *T)]  # an older DB's bare period names
    assert institution_epsilon(legacy, DELTA) == pytest.approx(pld([T, T]), rel=0.01)
    new = Release(key(banking(3, "labels 26-51")), *T)
    assert institution_epsilon(legacy[:1] + [new], DELTA) == pytest.approx(pld([T, T]), rel=0.01)


def test_keys_round_trip_any_names_and_fit_the_column():
    for scope in (DataScope("ab12", "column(column=a;b%c,freq=)", "x;y=z"), DataScope("ab12", "none", "all"),
                  DataScope("ab12", "column(column=" + "c" * 400 + ",freq=)", "p" * 300)):
        parsed = DataScope.parse(scope.key())
        assert len(scope.key()) <= 512 and parsed.key() == scope.key()
        assert parsed.dataset == scope.dataset and not parsed.disjoint(parsed)
    crafted = DataScope("ab12", "none", "a;slice=b").key()  # a slice cannot smuggle in a separator
    assert DataScope.parse(crafted).slice == "a;slice=b"


def test_preflight_refuses_a_reslicing_job_that_the_period_only_scope_let_through(tmp_path, monkeypatch):
    """Real reporter pre-flight on a real SQLite DB: 3-group history, then a 2-group job."""
    from fedseek.platform.run.reporter import PlatformReporter
    from fedseek.platform.store.settings import load_settings

    monkeypatch.setenv("FEDSEEK_DB_URL", f"sqlite:///{tmp_path / 'p.db'}")
    monkeypatch.setenv("FEDSEEK_HOME", str(tmp_path / "home"))
    budget = (epsilon([T], DELTA) + pld([T, T])) / 2  # one job fits, the same records twice do not
    monkeypatch.setenv("FEDSEEK_DEFAULT_EPSILON_MAX", str(budget))
    data = SimpleNamespace(task="banking77", institutions=["bank_a"], train=[range(3000)])
    first = banking(3, "labels 0-25")
    first.privacy.noise_multiplier, first.privacy.delta = T[0], DELTA
    first.optim.batch_fraction, first.optim.local_steps, first.federation.rounds = T[1], T[2], 1
    reporter = PlatformReporter(settings=load_settings())
    reporter.preflight(first, data)
    with session_scope(reporter.db) as session:
        ledger.add_entries(session, reporter.job_id, 1, [{"institution": "bank_a", "kind": "train", "sigma": T[0],
                           "q": T[1], "steps": T[2], "delta": DELTA}], reporter.scope, 1.0, budget)
    reporter.finished = True
    disjoint = banking(3, "labels 26-51")
    disjoint.privacy, disjoint.optim, disjoint.federation = first.privacy, first.optim, first.federation
    assert not any(p.exceeds for p in PlatformReporter(settings=load_settings()).preflight(disjoint, data))
    overlapping = banking(2, "labels 0-38")
    overlapping.privacy, overlapping.optim, overlapping.federation = first.privacy, first.optim, first.federation
    with pytest.raises(ledger.BudgetExceeded, match="bank_a"):
        PlatformReporter(settings=load_settings()).preflight(overlapping, data)
    with create_engine(reporter.db).connect() as connection:
        rows = connection.execute(text("SELECT status, data_scope FROM jobs ORDER BY id")).all()
    assert [r[0] for r in rows] == ["running", "running", "refused"]
    assert DataScope.parse(rows[2][1]).scheme == "intent-groups(groups=2,labels=label)"


def test_migration_widens_scope_columns_and_keeps_legacy_entries(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0003")  # a DB written by the previous FedSeek
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO tasks (name, description, created_at) VALUES ('t', '', '2026-01-01')"))
        connection.execute(text("INSERT INTO institutions (name, kind, epsilon_max, created_at) "
                                "VALUES ('bank_a', 'bank', 8, '2026-01-01')"))
        connection.execute(text("INSERT INTO jobs (task_id, data_scope, status, message, config_json, planned_rounds, "
                                "runner, started_at) VALUES (1, '2005-2009', 'finished', '', '{}', 1, 'simulate', "
                                "'2026-01-01')"))
        connection.execute(text("INSERT INTO privacy_ledger (institution_id, job_id, round_number, kind, data_scope, "
                                "sigma, q, steps, clip, delta, epsilon_after, epsilon_rdp_after, created_at) VALUES "
                                f"(1, 1, 1, 'train', '2005-2009', {T[0]}, {T[1]}, {T[2]}, 1, 1e-5, 1, 1, '2026-01-01')"))
    with session_scope(url) as session:  # opening it migrates it to head
        from fedseek.platform.store.db import Institution

        bank = session.query(Institution).filter_by(name="bank_a").one()
        ledger.add_entries(session, 1, 2, [{"institution": "bank_a", "kind": "train", "sigma": T[0], "q": T[1],
                                            "steps": T[2], "delta": DELTA}], key(banking(3, "labels 0-25")), 1.0, 8)
        assert ledger.spent(session, bank) == pytest.approx(pld([T, T]), rel=0.01)  # legacy: sequential
    columns = {t: {c["name"]: c["type"] for c in inspect(engine).get_columns(t)} for t in ("jobs", "privacy_ledger")}
    assert columns["jobs"]["data_scope"].length == 512 == columns["privacy_ledger"]["data_scope"].length


def test_a_period_name_without_a_scheme_cannot_claim_a_slice():
    # without --periods the job reads every record, whatever data.period says
    named = [JobConfig(), JobConfig()]
    named[0].data.period, named[1].data.period = "2005-2009", "2010-2013"
    assert {DataScope.parse(key(j)).slice for j in named} == {"all"}
    assert institution_epsilon([Release(key(j), *T) for j in named], DELTA) == pytest.approx(pld([T, T]), rel=0.01)
