"""Platform DB and privacy ledger on a real SQLite file and a real PostgreSQL server: migrations,
atomic rounds, pre-flight refusal, stopping before an over-budget round. No Flower here."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from sqlalchemy import func, inspect, select

from fedseek.config import JobConfig
from fedseek.data.tasks import load_federated_data
from fedseek.platform.run.reporter import PlatformReporter
from fedseek.platform.store import ledger
from fedseek.platform.store.db import Institution, Job, LedgerEntry, Period, Round, engine_for, session_scope, upgrade
from fedseek.platform.store.settings import PlatformSettings
from fedseek.privacy.accountant import epsilon
from fedseek.privacy.ledger_math import DataScope

TABLES = {"institutions", "tasks", "periods", "jobs", "rounds", "adapter_versions", "privacy_ledger",
          "promotion_decisions", "schedules", "alembic_version"}


@pytest.fixture(scope="module")
def small_data():
    return load_federated_data("banking77", institutions=3, max_train_rows=240)


def settings_for(db_url, tmp_path, budget=10.0) -> PlatformSettings:
    # MLflow at a closed port: tracking must buffer, never block the job
    return PlatformSettings(home=tmp_path / "home", db_url=db_url, mlflow_uri="http://127.0.0.1:9",
                            default_epsilon_max=budget)


def small_job(rounds=3, target=4.0) -> JobConfig:
    job = JobConfig()
    job.federation.rounds, job.optim.local_steps, job.privacy.target_epsilon = rounds, 2, target
    job.federation.out = "unused"
    return job


def round_row(number, sites, sigma, q=0.125, steps=2, delta=1e-5):
    clients = [{"institution": s, "noise_multiplier": sigma, "sample_rate": q, "steps": steps * number,
                "delta": delta, "epsilon": 1.0, "train_loss_last": 4.0, "num_examples": 80} for s in sites]
    return {"round": number, "accuracy": 0.1, "loss": 4.0, "train_loss": 4.0, "bytes_up": 10,
            "epsilon": {}, "elapsed_s": 1.0, "clients": clients}


def test_db_upgrade_command_creates_every_table(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    env = {**os.environ, "FEDSEEK_DB_URL": url, "FEDSEEK_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "fedseek", "db", "upgrade"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert TABLES <= set(inspect(engine_for(url)).get_table_names())
    bad = subprocess.run([sys.executable, "-m", "fedseek", "db", "upgrade"], capture_output=True, text=True,
                         env={**env, "FEDSEEK_DB_URL": "postgresql+psycopg://x@127.0.0.1:9/none"}, timeout=300)
    assert bad.returncode == 2 and "127.0.0.1:9" in bad.stderr and "Traceback" not in bad.stderr


def test_migrations_run_on_both_databases(db_url):
    upgrade(db_url)
    upgrade(db_url)  # idempotent
    assert TABLES <= set(inspect(engine_for(db_url)).get_table_names())


def test_an_older_schema_keeps_its_rows_and_is_migrated_forward_on_first_use(db_url):
    from alembic import command
    from alembic.config import Config

    from fedseek.platform.store import db

    upgrade(db_url, "0001")  # a DB written by the previous release
    with db.engine_for(db_url).begin() as connection:
        connection.exec_driver_sql("INSERT INTO institutions (name, kind, epsilon_max, created_at) "
                                   "VALUES ('bank_a', 'bank', 8.0, CURRENT_TIMESTAMP)")
    with session_scope(db_url) as session:  # first use: migrated to head, the row kept
        row = session.scalars(select(Institution)).one()
        assert (row.name, row.epsilon_max, row.node_id) == ("bank_a", 8.0, None)
    config = Config()
    config.set_main_option("script_location", str(db.MIGRATIONS))
    config.attributes["url"] = db_url
    command.downgrade(config, "0001")  # and back: the downgrade path works too
    assert "node_id" not in {c["name"] for c in inspect(engine_for(db_url)).get_columns("institutions")}
    assert "checkpoint_sha256" not in {c["name"] for c in inspect(engine_for(db_url)).get_columns("rounds")}


def test_a_round_and_its_ledger_entries_commit_together_or_not_at_all(db_url, tmp_path, small_data):
    reporter = PlatformReporter(settings=settings_for(db_url, tmp_path))
    job = small_job()
    reporter.preflight(job, small_data)
    reporter.start(job, small_data, {"accuracy": 0.01, "loss": 4.4})
    reporter.round(round_row(1, small_data.institutions, 1.0))
    entries = [{"institution": s, "kind": "train", "sigma": 1.0, "q": 0.125, "steps": 2, "delta": 1e-5}
               for s in small_data.institutions]
    entries[2]["sigma"] = None  # fails while writing the third ledger entry, after the round row
    with pytest.raises(TypeError):
        with session_scope(db_url) as session:
            ledger.commit_round(session, reporter.job_id, round_row(2, [], 1.0), entries, "all", 1.0, 10.0)
    with session_scope(db_url) as session:
        assert session.scalar(select(func.count(Round.id))) == 1
        assert session.scalar(select(func.count(LedgerEntry.id))) == 3  # round 1 only, none of round 2
        entries = session.scalars(select(LedgerEntry).order_by(LedgerEntry.id)).all()
        assert {e.institution.name for e in entries} == set(small_data.institutions)
        assert all(e.steps == 2 and e.kind == "train" and DataScope.parse(e.data_scope).slice == "all" for e in entries)
        assert entries[0].epsilon_after == pytest.approx(epsilon([(1.0, 0.125, 2)], 1e-5))


def test_preflight_refuses_a_job_that_would_exceed_a_budget(db_url, tmp_path, small_data):
    settings = settings_for(db_url, tmp_path)
    with session_scope(db_url) as session:
        session.add(Institution(name="bank_b", kind="bank", epsilon_max=3.0, delta=1e-5))
    reporter = PlatformReporter(settings=settings)
    with pytest.raises(ledger.BudgetExceeded, match=r"'bank_b' would exceed its privacy budget: epsilon_max 3, "
                                                    r"already spent 0.000, projected after this job 3.99"):
        reporter.preflight(small_job(target=4.0), small_data)
    with session_scope(db_url) as session:
        job = session.scalars(select(Job)).one()
        assert job.status == "refused" and "bank_b" in job.message
        assert session.scalar(select(func.count(LedgerEntry.id))) == 0
        # the other institutions were registered with the default budget; bank_b kept its own
        budgets = {i.name: i.epsilon_max for i in session.scalars(select(Institution))}
    assert budgets == {"bank_a": 10.0, "bank_b": 3.0, "bank_c": 10.0}
    PlatformReporter(settings=settings).preflight(small_job(target=2.9), small_data)  # fits


def test_second_job_is_refused_when_the_composed_history_would_exceed(db_url, tmp_path, small_data):
    settings = settings_for(db_url, tmp_path, budget=4.5)
    first = PlatformReporter(settings=settings)
    job = small_job(rounds=2, target=4.0)
    first.preflight(job, small_data)
    first.start(job, small_data, {"accuracy": 0.01, "loss": 4.4})
    sigma = ledger.planned_releases(job, len(small_data.train[0]), "all")[0][0].sigma
    for number in (1, 2):
        first.round(round_row(number, small_data.institutions, sigma))
    spent = epsilon([(sigma, 0.125, 2)] * 2, 1e-5)
    assert spent == pytest.approx(4.0, abs=0.05)
    with pytest.raises(ledger.BudgetExceeded, match="already spent 3.9"):
        PlatformReporter(settings=settings).preflight(small_job(rounds=2, target=4.0), small_data)


def test_running_job_stops_before_the_round_that_would_exceed(db_url, tmp_path, small_data):
    settings = settings_for(db_url, tmp_path, budget=4.5)
    reporter = PlatformReporter(settings=settings)
    job = small_job(rounds=4, target=1.0)  # pre-flight plans a job that fits...
    reporter.preflight(job, small_data)
    reporter.start(job, small_data, {"accuracy": 0.01, "loss": 4.4})
    reporter.round(round_row(1, small_data.institutions, 0.8))  # ...but the sites spend far more
    assert reporter.should_continue()
    reporter.round(round_row(2, small_data.institutions, 0.8))
    assert not reporter.should_continue()
    assert re.match(r"stopped before round 3: institution 'bank_a' would reach epsilon", reporter.stop_reason)
    with session_scope(db_url) as session:
        worst = max(e.epsilon_after for e in session.scalars(select(LedgerEntry)))
        assert session.scalar(select(func.count(Round.id))) == 2
    assert worst <= 4.5 < epsilon([(0.8, 0.125, 2)] * 3, 1e-5)


def test_fisher_passes_are_charged_and_scopes_compose_in_parallel(db_url, tmp_path, small_data):
    reporter = PlatformReporter(settings=settings_for(db_url, tmp_path, budget=50.0))
    job = small_job(rounds=1)
    job.data.periods, job.data.period = "years", "2005-2009"  # one continual-learning period: its ledger scope
    reporter.preflight(job, small_data)
    reporter.start(job, small_data, {"accuracy": 0.01, "loss": 4.4})
    row = round_row(1, small_data.institutions, 1.0)
    for client in row["clients"]:
        client.update(fisher_noise_multiplier=2.0, fisher_sample_rate=0.1, fisher_steps=3)
    reporter.round(row)
    with session_scope(db_url) as session:
        entries = session.scalars(select(LedgerEntry).where(LedgerEntry.institution.has(name="bank_a"))
                                  .order_by(LedgerEntry.id)).all()
        assert [(e.kind, DataScope.parse(e.data_scope).slice, e.steps) for e in entries] == [
            ("train", "2005-2009", 2), ("fisher", "2005-2009", 3)]
        assert entries[-1].epsilon_after == pytest.approx(epsilon([(1.0, 0.125, 2), (2.0, 0.1, 3)], 1e-5))
        assert [p.name for p in session.scalars(select(Period))] == ["2005-2009"]


def finished_report(tmp_path, name, sites, rows, fisher=()):
    out = tmp_path / name
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(name.encode())
    report = {"task": "banking77", "institutions": list(sites), "final_accuracy": 0.2, "rounds": rows,
              "adapter_dir": str(out / "adapter"), "epsilon": {}, "fisher": list(fisher)}
    (out / "report.json").write_text("{}")
    return report


def test_continual_periods_are_one_job_each_with_fisher_charged_at_finish(db_url, tmp_path, small_data):
    """A continual run calls start..finish once per period; Fisher passes arrive in report["fisher"]."""
    reporter = PlatformReporter(settings=settings_for(db_url, tmp_path, budget=50.0))
    sites = small_data.institutions
    for period, fisher in (("2005-2009", True), ("2010-2014", False)):
        job = small_job(rounds=1)
        job.data.periods, job.data.period = "years", period  # one period per job: scope = the period
        reporter.start(job, small_data, {"accuracy": float("nan"), "loss": float("nan")})
        row = round_row(1, sites, 1.0)  # cumulative steps restart with every period
        reporter.round(row)
        log = [{"institution": s, "kind": "fisher", "fisher_noise_multiplier": 10.0, "fisher_sample_rate": 0.5,
                "fisher_steps": 1, "delta": 1e-5} for s in sites] if fisher else []
        reporter.finish(finished_report(tmp_path, period, sites, [row], log))
    with session_scope(db_url) as session:
        jobs = session.scalars(select(Job).order_by(Job.id)).all()
        assert [(DataScope.parse(j.data_scope).slice, j.status) for j in jobs] == [("2005-2009", "finished"),
                                                                                    ("2010-2014", "finished")]
        entries = session.scalars(select(LedgerEntry).where(LedgerEntry.institution.has(name="bank_b"))
                                  .order_by(LedgerEntry.id)).all()
    assert [(e.job_id, e.kind, DataScope.parse(e.data_scope).slice, e.steps) for e in entries] == [
        (jobs[0].id, "train", "2005-2009", 2), (jobs[0].id, "fisher", "2005-2009", 1),
        (jobs[1].id, "train", "2010-2014", 2)]
    first_period = epsilon([(1.0, 0.125, 2), (10.0, 0.5, 1)], 1e-5)
    assert entries[-1].epsilon_after == pytest.approx(max(first_period, epsilon([(1.0, 0.125, 2)], 1e-5)))
    assert entries[-1].epsilon_after == pytest.approx(first_period)  # parallel, not sequential


def test_joint_arm_with_one_accuracy_row_finishes_with_heatmap_and_no_forgetting_tags(db_url, tmp_path, small_data):
    """The joint arm of a continual study scores one row (after all periods): the MLflow heat-map and
    the version tags must accept it (both once assumed a square matrix and failed the finished job)."""
    from fedseek.continual.report import cl_summary

    reporter = PlatformReporter(settings=settings_for(db_url, tmp_path, budget=50.0))
    job = small_job(rounds=1)
    job.data.period = "2005-2009|2010-2014"  # joint: one job on every period
    reporter.start(job, small_data, {"accuracy": float("nan"), "loss": float("nan")})
    row = round_row(1, small_data.institutions, 1.0)
    reporter.round(row)
    report = finished_report(tmp_path, "joint", small_data.institutions, [row])
    report["cl"] = cl_summary([[0.31, 0.42]], ["2005-2009", "2010-2014"], "joint", None)
    reporter.finish(report)
    with session_scope(db_url) as session:
        assert [j.status for j in session.scalars(select(Job))] == ["finished"]
    ops = reporter.outbox.ops()
    plots = [op["path"] for op in ops if op["op"] == "artifact" and op.get("artifact_path") == "plots"]
    heatmap = next(p for p in plots if p.endswith("accuracy_matrix.png"))
    assert os.path.getsize(heatmap) > 5000
    tags = next(op["tags"] for op in ops if op["op"] == "register")
    assert "forgetting" not in tags and "bwt" not in tags and tags["accuracy"] == 0.2
