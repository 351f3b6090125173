"""MLflow tracking through a durable outbox: every operation of a job (create run, params,
metrics, artifacts, model registration, promotion) is first appended to a JSON-lines journal under
`$FEDSEEK_HOME/outbox/`, with its files copied beside it, then replayed to MLflow in order. If the
server is unreachable, training goes on and the journal keeps the rest; `flush_all` (run at the
start of every job and by `fedseek db flush`) sends it later. Nothing is lost.

Runs are named by keys (`job`, `institution:bank_a`) in the journal; the MLflow ids they get on
replay are kept in the journal's state file, so a replay resumes where it stopped. Dataset inputs
(`inputs`), the privacy experiment's budget runs (`budget`) and the texts the UI shows are built
in `dashboard.py`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

logger = logging.getLogger("fedseek.tracking")
# fail fast when the server is down: the outbox, not HTTP retries, makes tracking reliable
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
logging.getLogger("mlflow").setLevel(logging.WARNING)
logging.getLogger("alembic").setLevel(logging.WARNING)


class Outbox:
    """The journal of one job's MLflow operations."""

    def __init__(self, directory: Path, name: str):
        self.directory = Path(directory)
        self.files = self.directory / name
        self.journal = self.directory / f"{name}.jsonl"
        self.state_path = self.directory / f"{name}.state.json"
        self.rejected = self.directory / f"{name}.rejected.json"
        self.files.mkdir(parents=True, exist_ok=True)

    def append(self, op: str, **fields) -> None:
        fields.setdefault("timestamp_ms", int(time.time() * 1000))  # replayed runs keep real times
        with self.journal.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"op": op, **fields}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def keep(self, path: Path, label: str) -> str:
        """Copy a file or directory into the outbox (the job's output may be overwritten later)."""
        target = self.files / label
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if Path(path).is_dir() else shutil.copy2)(path, target)
        return str(target)

    def ops(self) -> list[dict]:
        if not self.journal.exists():
            return []
        return [json.loads(line) for line in self.journal.read_text(encoding="utf-8").splitlines() if line]

    def state(self) -> dict:
        if self.state_path.exists():
            return json.loads(self.state_path.read_text())
        return {"done": 0, "runs": {}, "versions": {}}

    def save_state(self, state: dict) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_path)

    def pending(self) -> int:
        return len(self.ops()) - self.state()["done"]

    def flush(self, tracking_uri: str, artifact_root: Path | None) -> bool:
        """Replay pending operations; True when all are sent. A journal whose job has ended (last
        operation `close`) is removed once sent."""
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # mlflow resets it on import
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        state, ops = self.state(), self.ops()
        while state["done"] < len(ops):
            try:
                _apply(client, ops[state["done"]], state, artifact_root, tracking_uri)
            except Exception as err:
                if not reachable(tracking_uri):  # keep it and everything after it for later
                    logger.warning("MLflow not reachable (%s); %d operation(s) kept in %s",
                                   str(err).splitlines()[0][:200], len(ops) - state["done"], self.journal)
                    self.save_state(state)
                    return False
                # the server answered but refused this operation: set it aside, do not block the rest
                logger.error("MLflow refused %s: %s (kept in %s)", ops[state["done"]]["op"], err, self.rejected)
                with self.rejected.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps({"op": ops[state["done"]], "error": str(err)[:2000]}) + "\n")
            state["done"] += 1
            self.save_state(state)
        if not ops or ops[-1]["op"] != "close":
            return True
        shutil.rmtree(self.files, ignore_errors=True)
        for path in (self.journal, self.state_path):
            path.unlink(missing_ok=True)
        return True


def reachable(tracking_uri: str) -> bool:
    """Whether a tracking server answers (a local store always does)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return True
    import urllib.request

    try:
        urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=5)
        return True
    except OSError:
        return False


def _experiment_id(client, name: str, artifact_root: Path | None, tracking_uri: str) -> str:
    """The experiment `name`, created (or marked, if an older one) as a model-training experiment."""
    from fedseek.platform.mlflow.dashboard import EXPERIMENT_KIND

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if not set(EXPERIMENT_KIND.items()) <= set(experiment.tags.items()):
            for key, value in EXPERIMENT_KIND.items():
                client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    local = not tracking_uri.startswith(("http://", "https://"))
    location = (artifact_root / name).resolve().as_uri() if local and artifact_root else None
    return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)


def _apply(client, op: dict, state: dict, artifact_root: Path | None, tracking_uri: str) -> None:
    kind, runs = op["op"], state["runs"]
    if kind == "run":
        tags = {k: str(v) for k, v in op.get("tags", {}).items()}
        if op.get("parent"):
            tags["mlflow.parentRunId"] = runs[op["parent"]]
        experiment = _experiment_id(client, op["experiment"], artifact_root, tracking_uri)
        runs[op["key"]] = client.create_run(experiment, start_time=op.get("timestamp_ms"), run_name=op["name"],
                                            tags=tags).info.run_id
        if op.get("db_url") and op.get("job_id"):  # link the platform job to its MLflow run
            from fedseek.platform.store.db import Job, session_scope

            with session_scope(op["db_url"]) as session:
                session.get(Job, op["job_id"]).mlflow_run_id = runs[op["key"]]
    elif kind == "params":
        for key, value in op["params"].items():
            client.log_param(runs[op["key"]], key, value)
    elif kind == "tags":
        for key, value in op["tags"].items():
            client.set_tag(runs[op["key"]], key, str(value))
    elif kind == "metrics":
        from mlflow.entities import Metric

        stamp = int(op.get("timestamp_ms", 0))
        client.log_batch(runs[op["key"]], metrics=[Metric(k, float(v), stamp, int(op["step"]))
                                                   for k, v in op["metrics"].items()])
    elif kind == "table":  # generation samples of a round (public/test prompts, never records)
        client.log_table(runs[op["key"]], data=op["data"], artifact_file=op["artifact_file"])
    elif kind == "inputs":  # dataset inputs: counts and digests, never records
        from fedseek.platform.mlflow.dashboard import log_datasets

        log_datasets(client, runs[op["key"]], op["datasets"])
    elif kind == "budget":  # an institution's lifetime epsilon after a job, in the privacy experiment
        from fedseek.platform.mlflow.dashboard import BUDGET_EXPERIMENT, log_budget

        log_budget(client, _experiment_id(client, BUDGET_EXPERIMENT, artifact_root, tracking_uri), op)
    elif kind == "artifact":
        path = Path(op["path"])
        if path.is_dir():
            client.log_artifacts(runs[op["key"]], str(path), op.get("artifact_path"))
        else:
            client.log_artifact(runs[op["key"]], str(path), op.get("artifact_path"))
    elif kind == "reopen":  # a resumed job continues in its runs
        for key in op["keys"]:
            if key in runs:
                client.update_run(runs[key], status="RUNNING")
    elif kind == "attach":  # a resumed job whose journal was already sent: find its runs again
        runs[op["key"]] = op["run_id"]
        client.update_run(op["run_id"], status="RUNNING")
        parent = client.get_run(op["run_id"])
        for child in client.search_runs([parent.info.experiment_id],
                                        f"tags.mlflow.parentRunId = '{op['run_id']}'"):
            if "fedseek.institution" in child.data.tags:
                runs[f"institution:{child.data.tags['fedseek.institution']}"] = child.info.run_id
                client.update_run(child.info.run_id, status="RUNNING")
    elif kind == "close":
        pass  # the job has ended: nothing more will be appended
    elif kind == "end":
        client.set_terminated(runs[op["key"]], op.get("status", "FINISHED"), end_time=op.get("timestamp_ms"))
    elif kind == "register":
        from fedseek.platform.mlflow import registry

        state["versions"][op["key"]] = registry.register(client, op["model"], runs[op["key"]],
                                                        op["artifact_path"], op.get("tags", {}))
        if op.get("db_url") and op.get("adapter_version_id"):
            registry.record_version(op["db_url"], op["adapter_version_id"], op["model"],
                                    state["versions"][op["key"]])
    elif kind == "promote":
        from fedseek.platform.mlflow import registry

        registry.promote(client, op["model"], state["versions"][op["key"]], op["db_url"],
                         op.get("limits", {}))
    else:
        raise ValueError(f"unknown outbox operation {kind!r}")


def flush_all(outbox_dir: Path, tracking_uri: str, artifact_root: Path | None) -> tuple[int, int]:
    """Replay every journal in `outbox_dir` (oldest first): (sent, still pending) journals."""
    import warnings

    warnings.filterwarnings("ignore", module="mlflow")
    sent = pending = 0
    for journal in sorted(Path(outbox_dir).glob("*.jsonl"), key=lambda p: p.stat().st_mtime):
        if Outbox(journal.parent, journal.stem).flush(tracking_uri, artifact_root):
            sent += 1
        else:
            pending += 1
            break  # the server is down: later journals would fail the same way
    return sent, pending
