"""End to end: a bring-your-own (prompt, response) CSV through `fedseek simulate --objective causal-lm`
(real Flower simulation, DP at the default ε = 8, tracked into the platform DB and the MLflow outbox)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from fedseek.data.tasks import SHIPPED

INTENTS = ("card_arrival", "exchange_rate", "top_up_failed", "lost_or_stolen_card", "cash_withdrawal_charge",
           "pin_blocked")


@pytest.fixture(scope="module")
def pairs_job(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    with (SHIPPED / "banking77" / "train.csv").open(newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["category"] in INTENTS]
    path = root / "support_tickets.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["message", "reply"])
        for r in rows:
            writer.writerow([f"Which support queue handles this message: {r['text']}", r["category"].replace("_", " ")])
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "FEDSEEK_HOME": str(root / "home")}
    proc = subprocess.run([sys.executable, "-m", "fedseek", "simulate", "--data", str(path), "--objective", "causal-lm",
                           "--prompt-column", "message", "--response-column", "reply", "--institutions", "2",
                           "--rounds", "3", "--max-test-rows", "60", "--out", str(root / "job")],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"report": json.loads((root / "job" / "report.json").read_text()), "root": root, "rows": len(rows)}


def test_the_dp_job_reports_generation_metrics_every_round(pairs_job):
    report = pairs_job["report"]
    assert report["objective"] == "causal-lm" and report["dp"] and report["score_metric"] == "exact_match"
    assert max(report["epsilon"].values()) <= 8.0 + 1e-6
    rows = report["rounds"]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert {"perplexity", "exact_match", "rouge_l", "accuracy"} <= set(row)
        assert len(row["samples"]) == 8 and all(s["reference"] and "generated" in s for s in row["samples"])
    perplexities = [report["initial_perplexity"]] + [r["perplexity"] for r in rows]
    assert all(b < a for a, b in zip(perplexities, perplexities[1:])), perplexities  # falls round over round
    assert report["final_perplexity"] == rows[-1]["perplexity"] < report["initial_perplexity"] / 5
    assert report["final_exact_match"] == rows[-1]["exact_match"]
    assert 0.0 <= report["final_rouge_l"] <= 1.0


def test_the_adapter_generates_and_the_round_metrics_and_samples_are_journalled(pairs_job):
    from fedseek.models.generator import AdapterGenerator

    report, root = pairs_job["report"], pairs_job["root"]
    generator = AdapterGenerator.from_adapter(report["adapter_dir"])
    last = report["rounds"][-1]["samples"]
    assert generator.generate([s["prompt"] for s in last]) == [s["generated"] for s in last]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'home' / 'mlflow.db'}")  # the platform's local MLflow store
    run = client.search_runs([e.experiment_id for e in client.search_experiments()],
                             "tags.mlflow.runName LIKE '%job 1%'")[0]
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "perplexity")}
    assert sorted(history) == [0, 1, 2, 3] and history[3] == pytest.approx(report["final_perplexity"])
    tables = sorted(a.path for a in client.list_artifacts(run.info.run_id, "samples"))
    assert tables == [f"samples/round_{n:03d}.json" for n in (1, 2, 3)]
    table = json.loads(open(client.download_artifacts(run.info.run_id, tables[-1], str(root / "dl"))).read())
    assert [row[table["columns"].index("generated")] for row in table["data"]] == [s["generated"] for s in last]
    version = client.get_model_version_by_alias("fedseek-support_tickets", "candidate")
    assert version.run_id == run.info.run_id
