"""Coordinator faults (issue 7 item 2), on real processes: a `fedseek simulate` job is killed
three times — inside the commit of round 1 (FEDSEEK_CRASH_AT, an os._exit at that point), right
after the commit of round 1, and by SIGKILL of its whole process group once round 2 is committed —
and each time `fedseek jobs resume` continues it. The finished job must equal an uninterrupted
run of the same job: same adapter, same rounds, the same privacy-ledger entries (no round charged
twice or lost), and the DB, the checkpoints and MLflow must agree."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, text

# seeded DP noise (not private), so that the resumed job can be compared bit for bit with an
# uninterrupted one; this test platform allows it (FEDSEEK_ALLOW_REPRODUCIBLE_NOISE)
TINY = ["--recipe", "lora", "--task", "banking77", "--max-train-rows", "240", "--max-test-rows", "300", "--rounds", "4",
        "--local-steps", "2", "--epsilon", "4", "--reproducible-noise"]


def environment(home: Path) -> dict:
    home.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "PYTHONWARNINGS": "ignore", "FEDSEEK_HOME": str(home),
            "FEDSEEK_DB_URL": f"sqlite:///{home / 'platform.db'}", "FEDSEEK_DEFAULT_EPSILON_MAX": "50",
            "FEDSEEK_ALLOW_REPRODUCIBLE_NOISE": "1"}


def fedseek(env: dict, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedseek", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def snapshot(env: dict) -> dict:
    engine = create_engine(env["FEDSEEK_DB_URL"])
    with engine.connect() as db:
        state = {
            "status": db.execute(text("SELECT status FROM jobs WHERE id = 1")).scalar(),
            "rounds": [tuple(r) for r in db.execute(text(
                "SELECT number, accuracy, checkpoint_sha256 FROM rounds WHERE job_id = 1 ORDER BY number"))],
            "ledger": [tuple(r) for r in db.execute(text(
                "SELECT i.name, l.round_number, l.kind, l.sigma, l.q, l.steps, l.epsilon_after FROM privacy_ledger l "
                "JOIN institutions i ON i.id = l.institution_id ORDER BY i.name, l.round_number"))]}
    engine.dispose()
    checkpoints = Path(env["FEDSEEK_HOME"]) / "checkpoints" / "job-000001"
    state["checkpoints"] = sorted(p.name for p in checkpoints.glob("*.safetensors")) if checkpoints.exists() else []
    return state


def outbox_steps(env: dict) -> set[int]:
    journal = Path(env["FEDSEEK_HOME"]) / "outbox" / "job-000001.jsonl"
    ops = [json.loads(line) for line in journal.read_text().splitlines()] if journal.exists() else []
    return {op["step"] for op in ops if op["op"] == "metrics" and op["key"] == "job"}


def kill_when_committed(env: dict, rounds: int, *args: str, timeout: float = 1200) -> int:
    """Start `fedseek *args` in its own process group; SIGKILL the group once `rounds` are committed."""
    proc = subprocess.Popen([sys.executable, "-m", "fedseek", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(snapshot(env)["rounds"]) >= rounds:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.2)
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    reference_env, env = environment(root / "reference"), environment(root / "home")
    state = {"env": env, "out": root / "job", "reference_out": root / "reference-job"}
    # the uninterrupted reference job (its own home and DB) runs alongside the interrupted one: a
    # job's time is mostly per-process start-up (imports, Ray), which two jobs overlap
    log = root / "reference.log"
    with log.open("w") as handle:
        reference = subprocess.Popen([sys.executable, "-m", "fedseek", "simulate", *TINY, "--out",
                                      str(state["reference_out"])], env=reference_env, stdout=handle,
                                     stderr=subprocess.STDOUT, start_new_session=True)
    try:
        crashed = fedseek({**env, "FEDSEEK_CRASH_AT": "in-commit"}, "simulate", *TINY, "--out", str(state["out"]))
        state["in_commit"] = (crashed.returncode, snapshot(env), outbox_steps(env))
        crashed = fedseek({**env, "FEDSEEK_CRASH_AT": "after-commit"}, "jobs", "resume", "1")
        state["after_commit"] = (crashed.returncode, snapshot(env), outbox_steps(env))
        code = kill_when_committed(env, 2, "jobs", "resume", "1")
        state["killed"] = (code, snapshot(env))
        reference.wait(timeout=1200)
    finally:
        if reference.poll() is None:
            os.killpg(reference.pid, signal.SIGKILL)
    assert reference.returncode == 0, log.read_text()[-3000:]
    state["reference_db"] = snapshot(reference_env)
    yield state


def test_a_crash_inside_the_commit_leaves_no_round_and_no_charge(runs):
    code, db, _ = runs["in_commit"]
    assert code == 137
    assert db["status"] == "running" and db["rounds"] == [] and db["ledger"] == []
    assert db["checkpoints"] == ["round-0001.safetensors"]  # written first; orphaned until committed


def test_a_crash_after_the_commit_keeps_the_round_with_its_checkpoint_and_charges(runs):
    code, db, logged = runs["after_commit"]
    assert code == 137
    assert [r[0] for r in db["rounds"]] == [1] and db["rounds"][0][2]  # committed with its checkpoint digest
    assert sorted({r[0] for r in db["ledger"]}) == ["bank_a", "bank_b", "bank_c"]
    assert [r[1] for r in db["ledger"]] == [1, 1, 1]
    assert 1 not in logged  # died before the round reached the MLflow journal: the resume must add it


def test_sigkill_of_the_whole_process_group_after_round_two(runs):
    code, db = runs["killed"]
    assert code == -signal.SIGKILL
    assert db["status"] == "running" and len(db["rounds"]) >= 2


def test_resume_refuses_a_corrupt_checkpoint_and_a_live_owner_without_changing_anything(runs):
    env = runs["env"]
    before = snapshot(env)
    last = before["rounds"][-1][0]
    path = Path(env["FEDSEEK_HOME"]) / "checkpoints" / "job-000001" / f"round-{last:04d}.safetensors"
    original = path.read_bytes()
    path.write_bytes(original[:-8] + b"\x00" * 8)
    try:
        refused = fedseek(env, "jobs", "resume", "1")
    finally:
        path.write_bytes(original)
    assert refused.returncode == 2 and "does not match the digest" in refused.stderr and path.name in refused.stderr
    engine = create_engine(env["FEDSEEK_DB_URL"])
    with engine.begin() as db:  # pretend this (live) test process runs the job
        db.execute(text("UPDATE jobs SET owner = :o WHERE id = 1"), {"o": f"{socket.gethostname()}:{os.getpid()}"})
    engine.dispose()
    refused = fedseek(env, "jobs", "resume", "1")
    assert refused.returncode == 2 and "still running" in refused.stderr
    assert snapshot(env) == before


def test_the_resumed_job_equals_an_uninterrupted_run(runs):
    env = runs["env"]
    finished = fedseek(env, "jobs", "resume", "1", "--force")  # --force: the previous test set a live owner
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    db, reference = snapshot(env), runs["reference_db"]
    assert db["status"] == "finished"
    assert [r[:2] for r in db["rounds"]] == [r[:2] for r in reference["rounds"]]  # rounds 1..4 once, same accuracy
    assert len(db["ledger"]) == 12
    for entry, expected_entry in zip(db["ledger"], reference["ledger"]):  # same releases, none charged twice
        assert entry[:3] == expected_entry[:3] and entry[5] == expected_entry[5]
        assert entry[3:5] + entry[6:] == pytest.approx(expected_entry[3:5] + expected_entry[6:], rel=1e-9)
    report = json.loads((runs["out"] / "report.json").read_text())
    expected = json.loads((runs["reference_out"] / "report.json").read_text())
    assert report["resumed_after_round"] >= 2 and report["final_accuracy"] == expected["final_accuracy"]
    assert report["epsilon"] == pytest.approx(expected["epsilon"])  # clients' accountants continued
    from safetensors.numpy import load_file

    adapter = load_file(runs["out"] / "adapter" / "adapter_model.safetensors")
    reference_adapter = load_file(runs["reference_out"] / "adapter" / "adapter_model.safetensors")
    assert adapter.keys() == reference_adapter.keys()
    for name, tensor in adapter.items():
        np.testing.assert_allclose(tensor, reference_adapter[name], rtol=0, atol=1e-6, err_msg=name)
    # MLflow agrees with the DB: one run for the job, one accuracy value per round
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{Path(env['FEDSEEK_HOME']) / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("banking77")
    parents = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    assert [r.data.tags["fedseek.job_id"] for r in parents] == ["1"] and parents[0].info.status == "FINISHED"
    history = client.get_metric_history(parents[0].info.run_id, "accuracy")
    assert sorted(m.step for m in history) == [0, 1, 2, 3, 4]
    assert {m.step: m.value for m in history if m.step} == pytest.approx({r[0]: r[1] for r in db["rounds"]})
    again = fedseek(env, "jobs", "resume", "1")
    assert again.returncode == 2 and "is finished" in again.stderr
