"""The MLflow outbox against a real `mlflow server` on 127.0.0.1: nothing is lost while the server
is down, everything arrives in order once it is up, a refused operation does not block the rest."""
from __future__ import annotations

import json

from conftest import free_port, start_mlflow_server, stop

from fedseek.platform.mlflow.tracking import Outbox, flush_all


def test_outbox_keeps_records_while_server_is_down_and_flushes_them_later(tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    box = Outbox(tmp_path / "outbox", "job-000001")
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"final_accuracy": 0.5}))
    box.append("run", key="job", experiment="demo", name="job-1", tags={"fedseek.job_id": 1})
    box.append("run", key="institution:bank_a", parent="job", experiment="demo", name="bank_a")
    box.append("inputs", key="job", datasets=[{"name": "bank_a", "digest": "d1", "source": "scope-1",
                                               "profile": {"records": 80, "labels": 7}}])
    for job_id, spent in ((1, 1.5), (2, 3.0)):  # the budget view: one run per institution across jobs
        box.append("budget", institution="bank_a", epsilon_spent=spent, epsilon_max=8.0, step=job_id)
    for step in (1, 2):
        box.append("metrics", key="job", step=step, metrics={"accuracy": 0.1 * step}, timestamp_ms=1000 * step)
    box.append("metrics", key="job", step=3, metrics={"accuracy": "not a number"})  # refused later
    box.append("artifact", key="job", path=box.keep(report, "report.json"))
    report.unlink()  # the job's output may be gone by the time the server is back
    box.append("end", key="job")
    box.append("close")
    assert flush_all(tmp_path / "outbox", uri, None) == (0, 1)
    assert box.pending() == 11
    server = start_mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts"), port)
    try:
        assert flush_all(tmp_path / "outbox", uri, None) == (1, 0)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
        parent = next(r for r in runs if r.info.run_name == "job-1")
        child = next(r for r in runs if r.info.run_name == "bank_a")
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert [(m.step, m.value) for m in client.get_metric_history(parent.info.run_id, "accuracy")] == [
            (1, 0.1), (2, 0.2)]
        assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["report.json"]
        assert parent.info.status == "FINISHED"
        assert client.get_experiment_by_name("demo").tags["mlflow.experimentKind"] == "custom_model_development"
        [dataset] = [d.dataset for d in parent.inputs.dataset_inputs]
        assert (dataset.name, dataset.digest, json.loads(dataset.profile)) == ("bank_a", "d1", {"records": 80, "labels": 7})
        [budget] = client.search_runs([client.get_experiment_by_name("privacy").experiment_id])
        assert budget.info.run_name == "bank_a" and budget.data.metrics["epsilon_max"] == 8.0
        assert [(m.step, m.value) for m in client.get_metric_history(budget.info.run_id, "epsilon_spent")] == [
            (1, 1.5), (2, 3.0)]
    finally:
        stop(server)
    assert not list((tmp_path / "outbox").glob("*.jsonl"))  # sent journals are removed
    rejected = (tmp_path / "outbox" / "job-000001.rejected.json").read_text()
    assert "not a number" in rejected
