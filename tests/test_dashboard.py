"""The admin dashboard read in a real browser: two tiny `fedseek simulate` jobs recorded into a
real `mlflow server` on 127.0.0.1, one `fedseek promote`, then headless Debian Chromium must show
what an admin reads there: runs named for what they are with the privacy summary as their
description, each institution's dataset (counts and digest), the per-round charts, the "privacy"
experiment's budget chart (one line per institution, a step per job) and every registered
version's description (accuracy, ε, promotion decision and reason).
`FEDSEEK_SCREENSHOT_DIR=docs` writes the README's screenshots (dashboard-runs/-budget/-registry.png)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, start_mlflow_server, stop

TINY = ["--recipe", "lora", "--task", "banking77", "--max-train-rows", "240", "--max-test-rows", "150",
        "--rounds", "2", "--local-steps", "1", "--epsilon", "4"]
MODEL = "fedseek-banking77"
ML = "workflowType=machine_learning"  # the UI's "Model training" sidebar (the browser remembers the choice)


def chromium(window: str):
    """A factory of headless Chromium drivers of `window` size ("W,H"); skips the test where Debian's
    chromium + chromium-driver are missing."""
    chromedriver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (Path(chromedriver).exists() and (shutil.which("chromium") or shutil.which("chromium-browser"))):
        pytest.skip("Debian chromium + chromium-driver not installed (scripts/setup.sh installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={window}"):
        options.add_argument(flag)
    return lambda: webdriver.Chrome(service=Service(chromedriver), options=options)


def fedseek(env: dict, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "fedseek", *args], capture_output=True, text=True, timeout=1200,
                          env=env)
    assert done.returncode in (0, 1), done.stdout[-3000:] + done.stderr[-3000:]  # promote: 1 = rejected
    return done


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    new_driver = chromium("1500,1100")
    from mlflow.tracking import MlflowClient

    root, port = tmp_path_factory.mktemp("dashboard"), free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "FEDSEEK_HOME": str(root / "home"),
           "FEDSEEK_DB_URL": f"sqlite:///{root / 'platform.db'}", "FEDSEEK_DEFAULT_EPSILON_MAX": "20",
           "FEDSEEK_MLFLOW_URI": uri}
    server = start_mlflow_server(f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts"), port)
    driver = None
    try:
        fedseek(env, "institutions", "add", "bank_a", "--kind", "bank", "--epsilon-max", "12")
        for job in (1, 2):
            fedseek(env, "simulate", *TINY, "--seed", str(job), "--out", str(root / f"job{job}"))
        promoted = fedseek(env, "promote", "--task", "banking77", "--version", "1")
        driver = new_driver()
        driver.get(uri)  # an admin's browser that chose "Model training" and closed the assistant once
        driver.execute_script("localStorage.setItem('mlflow.workflowType_v1', '\"machine_learning\"');"
                              "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
                              "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false')")
        driver.refresh()
        yield {"client": MlflowClient(tracking_uri=uri, registry_uri=uri), "driver": driver, "uri": uri,
               "promoted": promoted, "shots": Path(os.environ.get("FEDSEEK_SCREENSHOT_DIR", root))}
    finally:
        if driver is not None:
            driver.quit()
        stop(server)


def page(dashboard, route: str, *texts: str) -> str:
    """Open `route` and wait until every one of `texts` is on the page; the page's text."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver = dashboard["driver"]
    driver.get(f"{dashboard['uri']}/#/{route}")
    body = lambda d: d.find_element("tag name", "body").text  # noqa: E731
    try:
        WebDriverWait(driver, 90).until(lambda d: all(t in body(d) for t in texts))
    except Exception:
        missing = [t for t in texts if t not in body(driver)]
        pytest.fail(f"#/{route} does not show {missing}; it shows:\n{body(driver)[:3000]}")
    return body(driver)


def shot(dashboard, name: str) -> None:
    time.sleep(3)  # let the charts finish drawing
    dashboard["driver"].save_screenshot(str(dashboard["shots"] / name))
    assert (dashboard["shots"] / name).read_bytes()[:4] == b"\x89PNG"


def jobs(dashboard):
    client = dashboard["client"]
    experiment = client.get_experiment_by_name("banking77")
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
    parents = sorted((r for r in runs if "mlflow.parentRunId" not in r.data.tags),
                     key=lambda r: int(r.data.tags["fedseek.job_id"]))
    return experiment, parents


def test_runs_are_named_for_what_they_are(dashboard):
    experiment, parents = jobs(dashboard)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    names = [f"banking77 · 3 institutions · ε 4 · job {job}" for job in (1, 2)]
    assert [r.info.run_name for r in parents] == names
    body = page(dashboard, f"experiments/{experiment.experiment_id}/runs?{ML}", *names)
    assert "Prompts" not in body and "Judges" not in body  # the model-training sidebar, not GenAI's


def test_each_institution_is_a_dataset_input_with_counts_never_records(dashboard):
    experiment, parents = jobs(dashboard)
    datasets = {d.dataset.name: d.dataset for d in parents[0].inputs.dataset_inputs}
    assert sorted(datasets) == ["bank_a", "bank_b", "bank_c"]
    profile = json.loads(datasets["bank_a"].profile)
    assert profile["records"] == 80 and 1 <= profile["labels"] <= 77 and profile["task_labels"] == 77
    assert "text" not in datasets["bank_a"].profile  # counts, never records
    firsts = [next(d.dataset for d in r.inputs.dataset_inputs if d.dataset.name == "bank_a") for r in parents]
    page(dashboard, f"experiments/{experiment.experiment_id}/runs?{ML}",  # the Dataset column
         *(f"bank_a ({d.digest})" for d in firsts))


def test_run_description_is_the_privacy_summary(dashboard):
    experiment, parents = jobs(dashboard)
    names = [r.info.run_name for r in parents]
    run = parents[1]
    body = page(dashboard, f"experiments/{experiment.experiment_id}/runs/{run.info.run_id}?{ML}",
                names[1], "ε spent (lifetime) / budget", "private (node CSPRNG)")
    rows = {line.split("|")[1].strip(): line.split("|") for line in run.data.tags["mlflow.note.content"].splitlines()
            if line.startswith("| bank_")}
    this_job = {name: float(cells[2]) for name, cells in rows.items()}
    spent = {name: float(cells[3].split("/")[0]) for name, cells in rows.items()}
    assert sorted(rows) == ["bank_a", "bank_b", "bank_c"]
    assert all(spent[n] > this_job[n] > 0 for n in rows)  # the lifetime ε composes over both jobs
    assert all(f"{spent[name]:.3f} / {limit}" in body for name, limit in (("bank_a", 12), ("bank_c", 20)))


def test_rounds_chart_well_with_step_round(dashboard):
    experiment, parents = jobs(dashboard)
    client = dashboard["client"]
    for run in parents:
        for key in ("accuracy", "epsilon/bank_a", "bytes_up"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)][-2:] == [1, 2], key
    page(dashboard, f"experiments/{experiment.experiment_id}/runs?{ML}&compareRunsMode=CHART",
         "accuracy", "bytes_up", "epsilon", "bank_b")
    shot(dashboard, "dashboard-runs.png")


def test_budget_view_steps_each_institutions_lifetime_epsilon_per_job_against_its_limit(dashboard):
    client = dashboard["client"]
    experiment = client.get_experiment_by_name("privacy")
    assert experiment is not None, "no 'privacy' experiment: the budget view is missing"
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["bank_a", "bank_b", "bank_c"]
    _, parents = jobs(dashboard)
    for name, limit in (("bank_a", 12.0), ("bank_b", 20.0)):
        history = client.get_metric_history(runs[name].info.run_id, "epsilon_spent")
        assert [m.step for m in history] == [int(r.data.tags["fedseek.job_id"]) for r in parents]
        assert 0 < history[0].value < history[1].value  # the lifetime budget composes over jobs
        assert runs[name].data.metrics["epsilon_max"] == limit
        assert runs[name].data.metrics["budget_used"] == pytest.approx(history[1].value / limit)
    page(dashboard, f"experiments/{experiment.experiment_id}/runs?{ML}&compareRunsMode=CHART",
         "epsilon_spent", "budget_used", "epsilon_max", "bank_a", "bank_c")
    shot(dashboard, "dashboard-budget.png")


def test_versions_describe_accuracy_epsilon_and_why_they_were_or_were_not_promoted(dashboard):
    client = dashboard["client"]
    for version in ("1", "2"):
        v = client.get_model_version(MODEL, version)
        decision = "Promoted to champion" if v.tags["promotion"] == "champion" else "NOT promoted"
        assert v.description.startswith(f"{decision}: {v.tags['promotion_reason']}")
        assert f"{float(v.tags['accuracy']):.2%}" in v.description and "bank_a" in v.description
    # `fedseek promote` decided on version 1 last: its description says what it decided, not job 1's gate
    said = " ".join(dashboard["promoted"].stdout.split())
    assert client.get_model_version(MODEL, "1").tags["promotion_reason"] in said
    versions = [client.get_model_version(MODEL, v) for v in ("1", "2")]
    # the version list shows the start of each description: the decision and the start of its reason
    page(dashboard, f"models/{MODEL}", "Version 2", "@ champion", "@ candidate",
         *(v.description[:25] for v in versions))
    reasons = [v.tags["promotion_reason"] for v in versions]
    shot(dashboard, "dashboard-registry.png")
    page(dashboard, f"models/{MODEL}/versions/2", reasons[1], "bank_a", "Accuracy")
