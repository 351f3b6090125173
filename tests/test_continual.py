"""End to end: `fedseek continual` runs two banking77 periods (intent groups) over 3 simulated banks
with DP, λ tuning on validation splits, EWC and a naive comparison arm in one real Flower
simulation. (That EWC forgets less than naive is asserted in test_ewc_forgetting.py, on a setting
large enough to forget; this run is kept small.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_simulation import TEST_ROWS, fedseek

TARGET_EPSILON = 8.0


@pytest.fixture(scope="module")
def continual_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("continual")
    proc = fedseek("continual", "--task", "banking77", "--period-groups", "2", "--max-train-rows", "900",
                   "--max-test-rows", TEST_ROWS,
                   "--rounds", "1", "--local-steps", "4", "--batch-fraction", "0.25", "--ewc-lambda", "5",
                   "--epsilon", str(TARGET_EPSILON), "--compare", "naive", "--tune-lambda", "0.5,5",
                   "--seed", "0", "--out", str(out), timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"report": json.loads((out / "report.json").read_text()), "out": out, "stdout": proc.stdout}


def test_report_has_the_cl_block_and_heatmap(continual_run):
    report, out = continual_run["report"], continual_run["out"]
    cl = report["cl"]
    assert {"accuracy_matrix", "acc", "bwt", "forgetting", "method", "lambda"} <= set(cl)
    assert cl["method"] == "ewc" and len(cl["accuracy_matrix"]) == 2 == len(cl["accuracy_matrix"][0])
    a = cl["accuracy_matrix"]
    assert cl["forgetting"] == pytest.approx(a[0][0] - a[1][0])
    assert cl["bwt"] == pytest.approx(a[1][0] - a[0][0])
    assert (out / "cl_heatmap.png").stat().st_size > 5000
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert "accuracy matrix" in continual_run["stdout"] and "naive" in continual_run["stdout"]


def test_fisher_pass_is_charged_within_the_period_budget(continual_run):
    period_one = json.loads((continual_run["out"] / "ewc" / "period-1" / "report.json").read_text())
    trained = period_one["rounds"][-1]["epsilon"]
    fisher = {e["institution"]: e for e in period_one["fisher"]}
    assert set(fisher) == {"bank_a", "bank_b", "bank_c"}
    for site, entry in fisher.items():
        assert entry["fisher_noise_multiplier"] > 0 and entry["fisher_steps"] == 1
        assert trained[site] < entry["epsilon"] <= TARGET_EPSILON + 1e-3  # Fisher included in ε
    last = json.loads((continual_run["out"] / "ewc" / "period-2" / "report.json").read_text())
    assert last["fisher"] == []  # nothing after the last period needs a Fisher


def test_lambda_is_chosen_on_validation_splits(continual_run):
    selection = continual_run["report"]["lambda_selection"]
    scores = {float(k): v for k, v in selection["validation_acc"].items()}
    assert set(scores) == {0.5, 5.0} and all(0.0 <= v <= 1.0 for v in scores.values())
    assert selection["chosen"] == max(scores, key=lambda k: (scores[k], -k))
    assert continual_run["report"]["cl"]["lambda"] == selection["chosen"]
