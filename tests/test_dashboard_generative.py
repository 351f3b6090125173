"""A causal-lm job in the admin dashboard, read in a real browser: its rounds are journalled
through the platform's own path (`job_tracking.open_runs` / `round_metrics` into an `Outbox`, then
`flush_all` to a real `mlflow server` on 127.0.0.1), without training a model: the round rows carry
perplexity, exact match, ROUGE-L and 8 generation samples of the shipped banking77-gen test split,
as a generative job's evaluation reports them. Headless Debian Chromium must show each round's
samples as a table (round, prompt, reference, generated) in the run's artifact view and the
perplexity chart in the runs' chart view.
`FEDSEEK_SCREENSHOT_DIR=docs` writes the README's screenshot (dashboard-samples.png)."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from conftest import free_port, start_mlflow_server, stop
from test_dashboard import ML, chromium, page, shot

ROUNDS = 3
RUN_NAME = "banking77-gen · 2 institutions · ε 8 · job 1"
HEADERS = ["round", "prompt", "reference", "generated"]


def round_rows(test) -> list[dict]:
    """What a DP causal-lm job's evaluation reports per round: perplexity falling, exact match and
    ROUGE-L rising, and the greedy answers to 8 test prompts (round r gets the first 3r - 2 right)."""
    prompts, references = list(test.texts[:8]), list(test.responses[:8])
    rows = []
    for r in range(1, ROUNDS + 1):
        right = 3 * r - 2
        generated = [ref if i < right else references[(i + 1) % 8] for i, ref in enumerate(references)]
        rows.append({"round": r, "loss": 2.5 / r, "accuracy": right / 8, "bytes_up": 120_000 * r,
                     "perplexity": 60.0 / r ** 1.5, "exact_match": right / 8, "rouge_l": min(1.0, right / 7),
                     "clients": [{"institution": name, "epsilon": 8.0 * r / ROUNDS, "noise_multiplier": 0.9,
                                  "sample_rate": 0.05, "steps": 4 * r} for name in ("bank_a", "bank_b")],
                     "samples": [{"prompt": p, "reference": ref, "generated": g}
                                 for p, ref, g in zip(prompts, references, generated)]})
    return rows


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    new_driver = chromium("1700,1000")
    from mlflow.tracking import MlflowClient

    from fedseek.config import DataSettings, FederationSettings, JobConfig
    from fedseek.data.tasks import load_federated_data
    from fedseek.platform.mlflow.tracking import Outbox, flush_all
    from fedseek.platform.run import job_tracking

    root, port = tmp_path_factory.mktemp("dashboard_generative"), free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts"), port)
    driver = None
    try:
        job = dataclasses.replace(JobConfig(), data=DataSettings(task="banking77-gen", objective="causal-lm"),
                                  federation=FederationSettings(rounds=ROUNDS))
        data = load_federated_data("banking77-gen", institutions=2, max_train_rows=200, max_test_rows=60)
        rows = round_rows(data.test)
        outbox = Outbox(root / "outbox", "job-000001")  # what PlatformReporter journals, in its order
        job_tracking.open_runs(outbox, job, data, 1, "", "all")
        outbox.append("metrics", key="job", step=0, metrics={"perplexity": 180.0, "exact_match": 0.0})
        for row in rows:
            job_tracking.round_metrics(outbox, row)
        for key in ("job", "institution:bank_a", "institution:bank_b"):
            outbox.append("end", key=key, status="FINISHED")
        outbox.append("close")
        assert flush_all(root / "outbox", uri, None) == (1, 0)
        assert not list((root / "outbox").glob("*.rejected.json")), "MLflow refused an operation"

        driver = new_driver()
        driver.get(uri)  # an admin's browser that chose "Model training" and closed the assistant once
        driver.execute_script("localStorage.setItem('mlflow.workflowType_v1', '\"machine_learning\"');"
                              "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
                              "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false')")
        driver.refresh()
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name("banking77-gen")
        run = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{RUN_NAME}'")[0]
        yield {"client": client, "driver": driver, "uri": uri, "rows": rows, "experiment": experiment,
               "run": run, "shots": Path(os.environ.get("FEDSEEK_SCREENSHOT_DIR", root))}
    finally:
        if driver is not None:
            driver.quit()
        stop(server)


def test_each_round_logs_its_samples_as_a_table_and_the_generation_metrics(dashboard, tmp_path):
    client, run = dashboard["client"], dashboard["run"]
    tables = [a["path"] for a in json.loads(run.data.tags["mlflow.loggedArtifacts"]) if a["type"] == "table"]
    assert tables == [f"samples/round_{r:03d}.json" for r in range(1, ROUNDS + 1)]
    last = dashboard["rows"][-1]
    table = json.loads(Path(client.download_artifacts(run.info.run_id, tables[-1], str(tmp_path))).read_text())
    assert table["columns"] == HEADERS  # pandas "split": what the UI's logged-table view reads
    assert [row[0] for row in table["data"]] == [ROUNDS] * 8
    assert [row[1:] for row in table["data"]] == [[s[k] for k in HEADERS[1:]] for s in last["samples"]]
    history = client.get_metric_history(run.info.run_id, "perplexity")
    assert [m.step for m in history] == [0, 1, 2, 3] and history[-1].value == pytest.approx(last["perplexity"])


def test_the_artifact_view_shows_a_rounds_samples_as_a_table(dashboard):
    """Artifacts → samples/round_003.json: MLflow's logged-table view (columns round, prompt,
    reference, generated; a cell's full text in the preview pane), not the raw JSON."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver, run, last = dashboard["driver"], dashboard["run"], dashboard["rows"][-1]
    samples = last["samples"]
    route = (f"experiments/{dashboard['experiment'].experiment_id}/runs/{run.info.run_id}/artifacts/"
             f"samples/round_{ROUNDS:03d}.json")
    page(dashboard, route, "View as table", *HEADERS, *(s["prompt"] for s in samples),
         *{s["reference"] for s in samples})
    headers = [h.text for h in driver.find_elements(By.CSS_SELECTOR, "[role=columnheader]")]
    assert headers == HEADERS, headers  # a table, not the file's JSON text
    cells = [[c.text for c in row.find_elements(By.CSS_SELECTOR, "[role=cell]")]
             for row in driver.find_elements(By.CSS_SELECTOR, "[role=row]")]
    cells = [row for row in cells if row]
    assert [row[0] for row in cells] == [str(ROUNDS)] * 8
    assert [row[3] for row in cells] == [s["generated"] for s in samples]  # what the adapter answered
    assert [row[2] for row in cells] == [s["reference"] for s in samples]
    # an admin hides the sidebar and resizes the columns by dragging their edges...
    from selenium.webdriver.common.action_chains import ActionChains

    driver.find_element(By.CSS_SELECTOR, "[aria-label='Toggle sidebar']").click()
    for column, offset in ((1, 300), (2, 50), (3, 50)):
        handle = driver.find_elements(By.CSS_SELECTOR, "[role=columnheader] [aria-label='Resize Column']")[column]
        ActionChains(driver).click_and_hold(handle).move_by_offset(offset, 0).release().perform()
    widths = [h.size["width"] for h in driver.find_elements(By.CSS_SELECTOR, "[role=columnheader]")]
    assert widths[1] > 400 and min(widths[2:]) > 180, widths
    # ...and a prompt still cut in its cell shows whole in the preview pane when clicked
    longest = max(range(8), key=lambda i: len(samples[i]["prompt"]))
    rows = [r for r in driver.find_elements(By.CSS_SELECTOR, "[role=row]") if r.find_elements(By.CSS_SELECTOR,
                                                                                              "[role=cell]")]
    rows[longest].find_elements(By.CSS_SELECTOR, "[role=cell]")[1].click()
    pane = "//h5[normalize-space()='Preview']/../.."  # the preview pane beside the table
    WebDriverWait(driver, 30).until(lambda d: samples[longest]["prompt"] in d.find_element(By.XPATH, pane).text)
    assert not any(s["prompt"] in driver.find_element(By.XPATH, pane).text for s in samples if s != samples[longest])
    shot(dashboard, "dashboard-samples.png")


def test_the_chart_view_plots_perplexity_exact_match_and_rouge_l_per_round(dashboard):
    """The runs' chart view (step = round) draws a chart of each generation metric for the job."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    experiment, driver = dashboard["experiment"], dashboard["driver"]
    route = f"experiments/{experiment.experiment_id}/runs?{ML}&compareRunsMode=CHART"
    page(dashboard, route, "Model metrics", "accuracy")
    search = driver.find_element(By.CSS_SELECTOR, "input[placeholder='Search metric charts']")
    for key in ("perplexity", "exact_match", "rouge_l"):  # the charts below the fold are drawn when shown
        search.send_keys(Keys.CONTROL, "a")  # React's input: replace its text by typing, not .clear()
        search.send_keys(key)
        legend = f"{RUN_NAME} ({key})"  # the job's line in the chart of `key`
        WebDriverWait(driver, 60).until(lambda d: legend in d.find_element(By.TAG_NAME, "body").text, key)
