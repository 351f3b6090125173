"""End to end on real components: `fedseek simulate` (Flower simulation) recording into a SQLite
platform DB and a real `mlflow server` on 127.0.0.1, which is down during the first job (its
records are buffered and flushed by the second); the ledger after two jobs equals the composed
history; a third job is refused before training; the champion adapter downloaded from the
registry loads with stock PEFT; the MLflow UI shows it all in headless Chromium."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dp_accounting
import pytest
import torch
from conftest import free_port, start_mlflow_server, stop
from sqlalchemy import create_engine, text

# the LoRA recipe: its registered adapter loads with stock PEFT (the probe recipe's head does not yet)
TINY = ["--recipe", "lora", "--task", "banking77", "--max-train-rows", "240", "--max-test-rows", "300", "--rounds", "2",
        "--local-steps", "2", "--epsilon", "4"]
MODEL = "fedseek-banking77"


def fedseek(env: dict, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedseek", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    root = tmp_path_factory.mktemp("platform")
    port = free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "FEDSEEK_HOME": str(root / "home"),
           "FEDSEEK_DB_URL": f"sqlite:///{root / 'platform.db'}", "FEDSEEK_DEFAULT_EPSILON_MAX": "8",
           "FEDSEEK_MLFLOW_URI": f"http://127.0.0.1:{port}"}
    state = {"root": root, "env": env, "port": port, "reports": [], "outputs": []}
    added = fedseek(env, "institutions", "add", "bank_a", "--kind", "bank", "--epsilon-max", "8")
    assert added.returncode == 0, added.stderr
    # job 1 while the tracking server is down: training goes on, MLflow records wait in the outbox
    first = fedseek(env, "simulate", *TINY, "--out", str(root / "job1"))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    state["pending_after_job1"] = sorted(p.name for p in (root / "home" / "outbox").glob("*.jsonl"))
    server = start_mlflow_server(f"sqlite:///{root / 'mlflow.db'}", str(root / "mlartifacts"), port)
    try:
        second = fedseek(env, "simulate", *TINY, "--seed", "1", "--out", str(root / "job2"))
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        third = fedseek(env, "simulate", *TINY[:-1], "8", "--out", str(root / "job3"))
        state.update(third=third, server=server)
        state["reports"] = [json.loads((root / f"job{i}" / "report.json").read_text()) for i in (1, 2)]
        yield state
    finally:
        stop(server)


def client_for(platform):
    from mlflow.tracking import MlflowClient

    uri = platform["env"]["FEDSEEK_MLFLOW_URI"]
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_first_job_was_buffered_while_mlflow_was_down_then_flushed(platform):
    assert platform["pending_after_job1"] == ["job-000001.jsonl"]
    assert not list((platform["root"] / "home" / "outbox").glob("*.jsonl"))  # all sent by job 2
    client = client_for(platform)
    experiment = client.get_experiment_by_name("banking77")
    runs = client.search_runs([experiment.experiment_id])
    parents = sorted((r for r in runs if "mlflow.parentRunId" not in r.data.tags), key=lambda r: r.info.run_name)
    assert [r.info.run_name for r in parents] == [f"banking77 · 3 institutions · ε 4 · job {i}" for i in (1, 2)]
    for parent in parents:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(r.info.run_name for r in children) == ["bank_a", "bank_b", "bank_c"]
        assert all(r.info.status == "FINISHED" for r in children + [parent])
        assert [m.step for m in client.get_metric_history(parent.info.run_id, "accuracy")] == [0, 1, 2]
        assert [m.step for m in client.get_metric_history(children[0].info.run_id, "epsilon")] == [1, 2]
        assert parent.data.params["lora_rank"] == "16" and parent.data.params["clip"] == "1.0"
        artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
        plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
        assert {"report.json", "adapter", "plots"} <= artifacts
        assert plots == {"plots/curves.png", "plots/epsilon.png"}


def test_ledger_after_two_jobs_equals_the_composed_history_and_third_job_is_refused(platform):
    from fedseek.privacy.accountant import epsilon

    engine = create_engine(platform["env"]["FEDSEEK_DB_URL"])
    with engine.connect() as connection:
        last = dict(connection.execute(text(
            "SELECT i.name, l.epsilon_after FROM privacy_ledger l JOIN institutions i ON i.id = l.institution_id "
            "WHERE l.id IN (SELECT max(id) FROM privacy_ledger GROUP BY institution_id)")).all())
        counts = dict(connection.execute(text("SELECT status, count(*) FROM jobs GROUP BY status")).all())
        entries = connection.execute(text("SELECT count(*) FROM privacy_ledger")).scalar()
    assert counts == {"finished": 2, "refused": 1} and entries == 2 * 2 * 3
    for site in ("bank_a", "bank_b", "bank_c"):
        history = [(c["noise_multiplier"], c["sample_rate"], 2) for report in platform["reports"]
                   for row in report["rounds"] for c in row["clients"] if c["institution"] == site]
        assert len(history) == 4
        assert last[site] == pytest.approx(epsilon(history, 1e-5), rel=1e-9)
        pld = dp_accounting.pld.PLDAccountant()
        for sigma, q, steps in history:
            pld.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
        assert last[site] == pytest.approx(pld.get_epsilon(1e-5), rel=0.01)
        assert last[site] > max(r["epsilon"][site] for r in platform["reports"])  # composed, not per job
    third = platform["third"]
    message = " ".join(third.stderr.split())
    assert third.returncode == 2, third.stderr
    assert "institution 'bank_a' would exceed its privacy budget: epsilon_max 8" in message
    assert f"already spent {last['bank_a']:.3f}" in message and "Nothing was trained" in message
    assert "Traceback" not in third.stderr and not (platform["root"] / "job3" / "report.json").exists()
    table = fedseek(platform["env"], "privacy", "--plot", str(platform["root"] / "eps.png"))
    assert table.returncode == 0 and f"{last['bank_a']:.3f}" in table.stdout
    assert (platform["root"] / "eps.png").read_bytes()[:4] == b"\x89PNG"


def test_registry_versions_aliases_and_recorded_promotion_decisions(platform):
    client = client_for(platform)
    model = client.get_registered_model(MODEL)
    assert model.aliases["candidate"] == "2"
    first, second = (r["final_accuracy"] for r in platform["reports"])
    assert model.aliases["champion"] == ("2" if second >= first else "1")
    decision = client.get_model_version(MODEL, "2").tags
    assert decision["promotion"] == ("champion" if second >= first else "rejected")
    assert ("champion's" in decision["promotion_reason"]) and decision["base_model_sha256"]
    engine = create_engine(platform["env"]["FEDSEEK_DB_URL"])
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT version, promoted, reason FROM promotion_decisions ORDER BY id")).all()
        versions = connection.execute(text("SELECT mlflow_version FROM adapter_versions ORDER BY id")).scalars().all()
    assert [(r[0], bool(r[1])) for r in rows] == [("1", True), ("2", second >= first)]
    assert versions == ["1", "2"]
    listing = fedseek(platform["env"], "versions", "--task", "banking77")
    assert listing.returncode == 0 and "champion" in listing.stdout and "candidate" in listing.stdout


def test_champion_downloaded_from_the_registry_loads_with_stock_peft(platform, tmp_path):
    from peft import PeftModel

    from fedseek.models.classifier import pooled_logits
    from fedseek.models.loading import load_classifier, load_tokenizer
    from fedseek.platform.mlflow.registry import download
    from fedseek.platform.run.reporter import adapter_sha256

    client = client_for(platform)
    champion = client.get_registered_model(MODEL).aliases["champion"]
    path = Path(download(client, MODEL, "champion", str(tmp_path)))
    job_adapter = platform["root"] / f"job{champion}" / "adapter"
    assert adapter_sha256(path) == adapter_sha256(job_adapter)
    labels = json.loads((path / "labels.json").read_text())
    tokenizer = load_tokenizer(None)
    batch = tokenizer(["I still have not received my card", "how do I top up"], return_tensors="pt", padding=True)
    logits = []
    for adapter in (path, job_adapter):
        model = PeftModel.from_pretrained(load_classifier(None, len(labels), tokenizer.pad_token_id), adapter).eval()
        with torch.no_grad():
            logits.append(pooled_logits(model, **batch))
    assert logits[0].shape == (2, 77) and torch.equal(logits[0], logits[1])
