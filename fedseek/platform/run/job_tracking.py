"""What a platform job journals for MLflow (through its `Outbox`): the job's parent run and one
child run per institution, per-round metrics with steps = rounds, and the finished job's
artifacts and plots. The reporter decides when; this module decides what."""
from __future__ import annotations

import math
from pathlib import Path

from fedseek.continual.report import heatmap_png
from fedseek.platform.mlflow import plots
from fedseek.platform.mlflow.tracking import Outbox
from fedseek.platform.store import ledger
from fedseek.platform.store.db import session_scope
from fedseek.privacy.randomness import noise_label

CLIENT_METRICS = ("epsilon", "epsilon_rdp", "train_loss_last", "noise_multiplier", "sample_rate", "steps",
                  "num_examples")


def finite(values: dict) -> dict:
    """The numeric, finite entries of `values` (MLflow refuses NaN/inf and None)."""
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def open_runs(outbox: Outbox, job, data, job_id: int, db_url: str, scope: str) -> None:
    """The job's MLflow run (params, privacy tags) and a child run per institution."""
    params = {"sigma": job.privacy.noise_multiplier, "q": job.optim.batch_fraction,
              "clip": job.privacy.clip_norm, "target_epsilon": job.privacy.target_epsilon,
              "delta": job.privacy.delta, "dp": job.privacy.enabled, "rounds": job.federation.rounds,
              "local_steps": job.optim.local_steps, "lora_rank": job.lora.rank, "ffa": job.lora.ffa,
              "institutions": ",".join(data.institutions), "data_scope": scope}
    outbox.append("run", key="job", experiment=data.task, name=f"job-{job_id}", db_url=db_url, job_id=job_id,
                  tags={"fedseek.job_id": job_id, "fedseek.data_scope": scope,
                        "fedseek.dp_noise": noise_label(job.privacy.enabled, job.privacy.reproducible_noise)})
    outbox.append("params", key="job", params={k: str(v) for k, v in params.items() if v is not None})
    for name, records in zip(data.institutions, data.train):
        outbox.append("run", key=f"institution:{name}", parent="job", experiment=data.task,
                      name=name, tags={"fedseek.institution": name})
        outbox.append("params", key=f"institution:{name}", params={"records": len(records)})


def round_metrics(outbox: Outbox, row: dict) -> None:
    """One committed round: the job's accuracy/loss/bytes and each institution's ε, σ, q, steps."""
    step = int(row["round"])
    outbox.append("metrics", key="job", step=step,
                  metrics=finite({k: row.get(k) for k in ("accuracy", "loss", "train_loss", "bytes_up")}))
    for client in row.get("clients", []):
        outbox.append("metrics", key=f"institution:{client['institution']}", step=step,
                      metrics=finite({k: client.get(k) for k in CLIENT_METRICS}))


def log_artifacts(outbox: Outbox, report: dict, out: Path, db_url: str) -> None:
    """report.json, the adapter, and the plots (curves, ε over time, CL accuracy matrix)."""
    keep = outbox.keep
    outbox.append("artifact", key="job", path=keep(out / "report.json", "report.json"))
    outbox.append("artifact", key="job", path=keep(Path(report["adapter_dir"]), "adapter"), artifact_path="adapter")
    plot_dir = outbox.files / "plots"
    files = [plots.curves(report["rounds"], plot_dir / "curves.png")] if report["rounds"] else []
    with session_scope(db_url) as session:
        series, budgets = ledger.epsilon_series(session, report["institutions"])
    if any(series.values()):
        files.append(plots.epsilon_over_time(series, budgets, plot_dir / "epsilon.png"))
    if (report.get("cl") or {}).get("accuracy_matrix"):  # square, or one row for the joint arm
        files.append(heatmap_png(report["cl"], plot_dir / "accuracy_matrix.png"))
    for path in files:
        outbox.append("artifact", key="job", path=str(path), artifact_path="plots")
