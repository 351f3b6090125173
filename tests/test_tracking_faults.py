"""Tracking faults (issue 7 item 3), on real processes: the MLflow server is stopped while a
`fedseek simulate` job is running (after its first round was recorded); the job finishes, the
platform DB has every round and ledger entry, the remaining MLflow records wait in the outbox, and
`fedseek db flush` sends them once the server is back, so MLflow ends equal to the DB. (An
unreachable platform DB at start is `test_platform_cli.py`: exit 2, nothing started.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import free_port, start_mlflow_server, stop
from sqlalchemy import create_engine, text

TINY = ["--task", "banking77", "--max-train-rows", "240", "--max-test-rows", "300", "--rounds", "4", "--local-steps", "2",
        "--epsilon", "4"]


def committed_rounds(db_url: str) -> list[tuple[int, float]]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as db:
            if not db.dialect.has_table(db, "rounds"):
                return []
            return [tuple(r) for r in db.execute(text("SELECT number, accuracy FROM rounds ORDER BY number"))]
    finally:
        engine.dispose()


def test_mlflow_down_mid_job_the_job_finishes_and_the_records_follow_when_it_returns(tmp_path):
    home, port = tmp_path / "home", free_port()
    home.mkdir()
    db_url = f"sqlite:///{tmp_path / 'platform.db'}"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "FEDSEEK_HOME": str(home), "FEDSEEK_DB_URL": db_url,
           "FEDSEEK_MLFLOW_URI": f"http://127.0.0.1:{port}", "FEDSEEK_DEFAULT_EPSILON_MAX": "50"}
    backend, artifacts = f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "mlartifacts")
    server = start_mlflow_server(backend, artifacts, port)
    job = subprocess.Popen([sys.executable, "-m", "fedseek", "simulate", *TINY, "--out", str(tmp_path / "job")],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 1200
        while not committed_rounds(db_url) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert committed_rounds(db_url), "round 1 was never committed"
        stop(server)  # the tracking server goes away in the middle of the job
        server = None
        output, _ = job.communicate(timeout=1200)
    finally:
        if job.poll() is None:
            job.kill()
        if server is not None:
            stop(server)
    assert job.returncode == 0, output[-3000:]
    rounds = committed_rounds(db_url)
    assert [n for n, _ in rounds] == [1, 2, 3, 4]
    engine = create_engine(db_url)
    with engine.connect() as db:
        assert db.execute(text("SELECT status FROM jobs")).scalar() == "finished"
        assert db.execute(text("SELECT count(*) FROM privacy_ledger")).scalar() == 12
    engine.dispose()
    journal = home / "outbox" / "job-000001.jsonl"
    assert journal.is_file()  # what MLflow has not received is kept
    state = json.loads((home / "outbox" / "job-000001.state.json").read_text())
    assert 0 < state["done"] < len(journal.read_text().splitlines())

    server = start_mlflow_server(backend, artifacts, port)  # the server is back
    try:
        flushed = subprocess.run([sys.executable, "-m", "fedseek", "db", "flush"], env=env, capture_output=True,
                                 text=True, timeout=600)
        assert flushed.returncode == 0, flushed.stdout + flushed.stderr
        assert not journal.exists()  # sent in full, then removed
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=env["FEDSEEK_MLFLOW_URI"], registry_uri=env["FEDSEEK_MLFLOW_URI"])
        experiment = client.get_experiment_by_name("banking77")
        parents = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
        assert [(r.data.tags["fedseek.job_id"], r.info.status) for r in parents] == [("1", "FINISHED")]
        history = client.get_metric_history(parents[0].info.run_id, "accuracy")
        assert sorted((m.step, m.value) for m in history if m.step) == rounds  # MLflow equals the DB
        versions = client.search_model_versions("name='fedseek-banking77'")
        assert [v.run_id for v in versions] == [parents[0].info.run_id]
        assert "adapter" in {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    finally:
        stop(server)
    assert Path(tmp_path / "job" / "report.json").is_file()
