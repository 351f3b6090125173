"""End to end: `fedseek simulate` runs a real Flower simulation (Ray backend) of 3 institutions."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# the server evaluates a seeded subset of the test set (initially and every round; the whole set was
# most of a small job's time), large enough that learning shows with a wide margin. The LoRA run's
# gain is the smallest (0.030 to 0.060 on banking77 over 8 runs, 2026-12-03), so it gets more rows.
TEST_ROWS, LORA_TEST_ROWS = "500", "1000"
REPORT_KEYS = {"task", "final_accuracy", "rounds", "epsilon", "delta", "noise_multiplier", "sampling_rate",
               "steps", "clip_norm", "adapter_bytes", "base_model_bytes", "trainable_params", "total_params",
               "adapter_dir"}


def assert_learned(report: dict, test_rows: str) -> None:
    """The final accuracy beats the initial one by more than chance allows: a one-sided two-proportion
    z-test on the evaluated rows at p < 0.001 (z > 3.09). A DP run's gain varies from run to run (its
    noise is private, never seeded), so a fixed margin either flakes or says nothing; this bar fails
    only when the gain is indistinguishable from evaluation noise (e.g. 0.01 -> 0.025 on 1,000 rows)."""
    before, after, rows = report["initial_accuracy"], report["final_accuracy"], int(test_rows)
    pooled = (before + after) / 2
    z = (after - before) / math.sqrt(2 * pooled * (1 - pooled) / rows)
    assert z > 3.09, f"accuracy {before:.3f} -> {after:.3f} on {rows} rows (z = {z:.2f}): no significant gain"


def fedseek(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "fedseek", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def banking_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("banking")
    # the LoRA recipe: its adapter (LoRA + a stock `score` head) loads with stock PEFT; the default
    # probe recipe's head reads public-projected multi-layer features (tests/test_dp_recipe.py and
    # the user-CSV run below)
    proc = fedseek("simulate", "--task", "banking77", "--institutions", "3", "--rounds", "2", "--recipe", "lora",
                   "--local-steps", "6", "--max-train-rows", "2400", "--max-test-rows", LORA_TEST_ROWS,
                   "--epsilon", "8", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"report": json.loads((out / "report.json").read_text()), "stdout": proc.stdout, "out": out}


def test_two_round_dp_simulation_improves_and_reports(banking_run):
    report = banking_run["report"]
    assert REPORT_KEYS <= set(report)
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert_learned(report, LORA_TEST_ROWS)
    assert set(report["epsilon"]) == {"bank_a", "bank_b", "bank_c"}
    assert all(0 < e <= 8.0 + 1e-3 for e in report["epsilon"].values())
    first, second = report["rounds"]
    assert all(first["epsilon"][s] < second["epsilon"][s] for s in report["epsilon"])  # composes
    assert report["noise_multiplier"] > 0 and report["steps"] == 12
    # only adapter tensors travel: every upload is far smaller than the base model
    assert 0 < second["bytes_up"] < report["base_model_bytes"]
    assert report["trainable_params"] < report["total_params"] / 5
    assert "round" in banking_run["stdout"] and "eps bank_a" in banking_run["stdout"]


def test_adapter_loads_with_stock_peft(banking_run):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    report = banking_run["report"]
    adapter = Path(report["adapter_dir"])
    labels = json.loads((adapter / "labels.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(report["base_model"], num_labels=len(labels))
    model = PeftModel.from_pretrained(base, adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(report["base_model"])
    from fedseek.data.tasks import load_federated_data
    from fedseek.models.classifier import pooled_logits

    test = load_federated_data("banking77", seed=0, max_test_rows=int(LORA_TEST_ROWS)).test  # the job's rows
    predictions = []
    with torch.no_grad():
        for start in range(0, len(test), 256):
            batch = tokenizer(test.texts[start:start + 256], padding=True, truncation=True, max_length=64,
                              return_tensors="pt")
            predictions.extend(pooled_logits(model, **batch).argmax(-1).tolist())
    accuracy = float((np.array(predictions) == test.labels).mean())
    # the stock-loaded adapter reproduces the accuracy the federation reported
    assert accuracy == pytest.approx(report["final_accuracy"], abs=0.01), accuracy


def test_simulate_on_a_user_csv_it_has_never_seen(tmp_path):
    from fedseek.data.tasks import load_federated_data

    source = load_federated_data("medical_abstracts")
    path = tmp_path / "clinic_notes.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["note", "diagnosis"])
        for site in source.train:
            for text, label in zip(site.texts, site.labels):
                writer.writerow([text[:300], source.label_names[label]])
    out = tmp_path / "out"
    proc = fedseek("simulate", "--data", str(path), "--text-column", "note", "--label-column", "diagnosis",
                   "--institutions", "3", "--partition", "dirichlet", "--alpha", "1.0", "--rounds", "2",
                   "--local-steps", "4", "--max-train-rows", "2400", "--max-test-rows", TEST_ROWS, "--no-dp",
                   "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "clinic_notes" and report["num_labels"] == 5
    assert report["epsilon"] is None and report["dp"] is False
    assert report["final_accuracy"] > report["initial_accuracy"]
