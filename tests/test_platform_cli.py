"""Platform admin commands: help text, clear errors and exit codes (temp DB and MLflow store)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "PYTHONWARNINGS": "ignore", "FEDSEEK_HOME": str(tmp_path / "home"),
            "FEDSEEK_DB_URL": f"sqlite:///{tmp_path / 'p.db'}"}


def fedseek(env, *args):
    return subprocess.run([sys.executable, "-m", "fedseek", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_help_lists_every_platform_command(env):
    out = fedseek(env, "--help").stdout
    for command in ("db", "institutions", "tasks", "jobs", "privacy", "versions", "promote", "dashboard",
                    "schedule", "scheduler"):
        assert f" {command} " in out, command
    assert "--no-track" in fedseek(env, "simulate", "--help").stdout


def test_institutions_budgets_and_errors(env):
    assert fedseek(env, "institutions", "add", "hospital_a", "--kind", "hospital", "--epsilon-max", "6").returncode == 0
    listing = fedseek(env, "institutions", "list")
    assert listing.returncode == 0 and "hospital_a" in listing.stdout and "6" in listing.stdout
    bad = fedseek(env, "institutions", "add", "hospital_b", "--kind", "school", "--epsilon-max", "6")
    assert bad.returncode == 2 and "school" in bad.stderr
    tasks = fedseek(env, "tasks", "--add", "discharge_notes", "--description", "ICD chapters")
    assert tasks.returncode == 0 and "discharge_notes" in tasks.stdout and "fedseek-discharge_notes" in tasks.stdout
    negative = fedseek(env, "institutions", "add", "hospital_b", "--epsilon-max", "-1")
    assert negative.returncode == 2 and "--epsilon-max" in negative.stderr


def test_registry_commands_fail_clearly_without_versions(env):
    versions = fedseek(env, "versions", "--task", "nope")
    assert versions.returncode in (1, 2) and "fedseek-nope" in versions.stderr and "Traceback" not in versions.stderr
    promote = fedseek(env, "promote", "--task", "nope")
    assert promote.returncode == 2 and "fedseek-nope" in promote.stderr and "Traceback" not in promote.stderr
    schedule = fedseek(env, "schedule", "add", "--task", "banking77", "--cron", "every monday")
    assert schedule.returncode == 2 and "--cron 'every monday'" in " ".join(schedule.stderr.split())


def test_simulate_refuses_clearly_when_the_platform_db_is_unreachable(env, tmp_path):
    env = {**env, "FEDSEEK_DB_URL": "postgresql+psycopg://fedseek@127.0.0.1:9/none"}
    proc = fedseek(env, "simulate", "--max-train-rows", "120", "--rounds", "1", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "platform DB unreachable" in proc.stderr and "--no-track" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out" / "report.json").exists()


def test_versions_without_a_task_lists_every_tasks_versions(env, tmp_path):
    empty = fedseek(env, "versions")
    assert empty.returncode == 1 and "no registered adapter versions yet" in empty.stderr
    from mlflow.tracking import MlflowClient

    home = tmp_path / "home"
    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for task, accuracy in (("banking77", "0.65"), ("pubmedqa", "0.53")):
        client.create_registered_model(f"fedseek-{task}")
        version = client.create_model_version(f"fedseek-{task}", source=str(tmp_path / task), tags={
            "accuracy": accuracy, "epsilon": "7.99", "promotion": "champion", "promotion_reason": "first version"})
        client.set_registered_model_alias(f"fedseek-{task}", "champion", version.version)
    client.create_registered_model("someone-else")  # not a FedSeek task: not listed
    listing = fedseek({**env, "COLUMNS": "200"}, "versions")
    assert listing.returncode == 0, listing.stderr
    rows = [line for line in listing.stdout.splitlines() if "fedseek-" in line]
    assert len(rows) == 2 and "65.00%" in rows[0] and "53.00%" in rows[1] and "someone-else" not in listing.stdout
    assert all("champion" in row for row in rows)
    one = fedseek({**env, "COLUMNS": "200"}, "versions", "--task", "pubmedqa")
    assert one.returncode == 0 and "fedseek-pubmedqa" in one.stdout and "fedseek-banking77" not in one.stdout
