"""`--compare` / `--tune-lambda` arms are jobs like any other: pre-flight checked and charged to the
same institutions' ledger (before, they ran untracked, each arm with a fresh budget), and noised
validation counts (`evaluate.validation`, used by --tune-lambda) are charged as releases.
Attacker: an operator who runs the same institutions' records again as a "comparison arm"."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from sqlalchemy import create_engine, text

from fedseek.privacy.accountant import epsilon

TINY = ["--task", "banking77", "--period-groups", "2", "--max-train-rows", "240", "--max-test-rows", "200", "--rounds", "1",
        "--local-steps", "2", "--batch-fraction", "0.25", "--noise-multiplier", "1.0"]
RELEASE = (1.0, 0.25, 2)  # sigma, q, steps of one period job's round


def platform_env(root, budget: float) -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "FEDSEEK_HOME": str(root / "home"),
            "FEDSEEK_DB_URL": f"sqlite:///{root / 'p.db'}", "FEDSEEK_DEFAULT_EPSILON_MAX": str(budget),
            "FEDSEEK_MLFLOW_URI": f"sqlite:///{root / 'mlflow.db'}"}


def fedseek(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedseek", "continual", *args], capture_output=True, text=True,
                          env=env, timeout=1500)


def query(root, sql: str) -> list:
    with create_engine(f"sqlite:///{root / 'p.db'}").connect() as connection:
        return connection.execute(text(sql)).all()


def test_a_comparison_arm_cannot_spend_the_budget_again(tmp_path):
    # naive: two disjoint periods, each within the budget; the joint arm trains the same records
    # again (sequentially composed: 3 releases), which the budget does not allow
    budget = (epsilon([RELEASE], 1e-5) + epsilon([RELEASE] * 2, 1e-5)) / 2
    proc = fedseek(platform_env(tmp_path, budget), *TINY, "--cl", "naive", "--compare", "joint",
                   "--out", str(tmp_path / "out"))
    message = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "would exceed its privacy budget" in message and "Traceback" not in proc.stderr
    jobs = query(tmp_path, "SELECT status, config_json FROM jobs ORDER BY id")
    assert [j[0] for j in jobs] == ["finished", "finished", "refused"]
    assert '"ewc.method": "joint"' in jobs[2][1]  # the refused job is the comparison arm
    charged = query(tmp_path, "SELECT i.name, max(l.epsilon_after) FROM privacy_ledger l JOIN institutions i "
                              "ON i.id = l.institution_id GROUP BY i.name")
    assert {name for name, _ in charged} == {"bank_a", "bank_b", "bank_c"}
    assert all(value <= budget + 1e-9 for _, value in charged)
    assert not (tmp_path / "out" / "joint" / "period-1" / "report.json").exists()  # nothing of it trained


def test_tuning_arms_are_preflighted_and_charged(tmp_path):
    proc = fedseek(platform_env(tmp_path, 1000.0), *TINY, "--cl", "ewc", "--tune-lambda", "0.5", "--tune-only",
                   "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    jobs = query(tmp_path, "SELECT id, status FROM jobs ORDER BY id")
    assert [j[1] for j in jobs] == ["finished", "finished"]  # period 1 once, period 2 for λ = 0.5
    kinds = dict(query(tmp_path, "SELECT kind, count(*) FROM privacy_ledger WHERE kind != 'validation' GROUP BY kind"))
    assert kinds == {"train": 6, "fisher": 3}  # 3 banks: 2 jobs of 1 round, 1 Fisher pass


# -- noised validation counts --------------------------------------------------------------------
def _instruction(node: int) -> Message:
    metadata = Metadata(run_id=1, message_id=f"v{node}", src_node_id=0, dst_node_id=node, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=3600, message_type="evaluate.validation")
    return Message(RecordDict({"config": ConfigRecord({"x": 1})}), metadata=metadata)


def _validation(node: int, name: str, **metrics) -> Message:
    return Message(RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"institution": name})}),
                   reply_to=_instruction(node))


class Grid:
    """Delivers the prepared replies of the nodes it is asked (the institutions' side)."""

    def __init__(self, replies: dict[int, Message]):
        self.replies = replies

    def get_node_ids(self):
        return list(self.replies)

    def send_and_receive(self, messages):
        return [self.replies[m.metadata.dst_node_id] for m in messages]


def test_noised_validation_counts_are_charged_to_the_bound_institution(tmp_path, monkeypatch):
    from fedseek.aggregator.continual_app import ContinualRunner
    from fedseek.config import JobConfig
    from fedseek.data.plan import data_scope, dataset_fingerprint
    from fedseek.platform.run.reporter import PlatformReporter
    from fedseek.platform.store.settings import load_settings
    from fedseek.privacy.ledger_math import DataScope

    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # as inside a ServerApp
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setenv("FEDSEEK_DB_URL", f"sqlite:///{tmp_path / 'p.db'}")
    monkeypatch.setenv("FEDSEEK_HOME", str(tmp_path / "home"))
    job = JobConfig()
    job.data.periods, job.data.period_groups, job.data.max_train_rows = "intent-groups", 2, 240
    job.data.validation_fraction, job.data.period = 0.1, "labels 39-76"
    reporter = PlatformReporter(settings=load_settings())
    reporter.preflight(job, SimpleNamespace(task="banking77", institutions=["bank_a"], train=[range(100)]))
    noised = dict(correct=4.7, total=9.2, delta=1e-5)
    runner = ContinualRunner.__new__(ContinualRunner)
    runner.reporter, runner.label_names, runner.nodes = reporter, [str(i) for i in range(77)], {1: "bank_a", 2: "bank_b", 3: "bank_c"}
    runner.grid = Grid({
        1: _validation(1, "bank_a", **noised, **{"noise-multiplier": 2.0, "sample-rate": 1.0, "steps": 1}),
        2: _validation(2, "bank_a", **noised, **{"noise-multiplier": 4.0, "sample-rate": 0.01, "steps": 1}),  # claims bank_a
        3: _validation(3, "bank_c", **noised, **{"noise-multiplier": float("nan"), "steps": 1}),  # unaccountable
    })
    accuracy = runner.validate(ArrayRecord(), job, "labels 0-38")
    assert accuracy == pytest.approx(9.4 / 18.4)  # bank_c's counts are left out
    rows = query(tmp_path, "SELECT i.name, l.kind, l.sigma, l.q, l.steps, l.data_scope, l.epsilon_after FROM "
                           "privacy_ledger l JOIN institutions i ON i.id = l.institution_id ORDER BY l.id")
    period = JobConfig.from_flat({**job.to_flat(), "data.period": "labels 0-38"})
    assert [r[:5] for r in rows] == [("bank_a", "validation", 2.0, 1.0, 1),  # at rate 1, whatever is claimed
                                     ("bank_b", "validation", 4.0, 1.0, 1)]  # the bound name, not the claimed
    assert {r[5] for r in rows} == {data_scope(period, dataset_fingerprint(period))}
    assert DataScope.parse(rows[0][5]).slice == "labels 0-38"  # the validation records' period
    assert rows[0][6] == pytest.approx(epsilon([(2.0, 1.0, 1)], 1e-5), rel=1e-6)
