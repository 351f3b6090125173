"""What a platform job journals for MLflow (through its `Outbox`): the job's parent run (named
for what it is, its description the privacy summary) and one child run per institution, dataset
inputs, per-round metrics with steps = rounds, the finished job's artifacts and plots, and each
institution's lifetime budget step in the privacy experiment. The reporter decides when; this
module decides what (the texts: `fedseek.platform.mlflow.dashboard`)."""
from __future__ import annotations

import math
from pathlib import Path

from fedseek.aggregator.period import GENERATION_METRICS
from fedseek.continual.report import heatmap_png
from fedseek.platform.mlflow import dashboard, plots
from fedseek.platform.mlflow.tracking import Outbox
from fedseek.platform.store import ledger
from fedseek.platform.store.db import session_scope
from fedseek.privacy.ledger_math import DataScope
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
    noise = noise_label(job.privacy.enabled, job.privacy.reproducible_noise)
    name = dashboard.run_name(data.task, len(data.institutions), job.privacy, job_id, DataScope.parse(scope).slice)
    outbox.append("run", key="job", experiment=data.task, name=name, db_url=db_url, job_id=job_id,
                  tags={"fedseek.job_id": job_id, "fedseek.data_scope": scope, "fedseek.dp_noise": noise,
                        dashboard.DESCRIPTION: dashboard.planned_summary(job, noise, scope)})
    outbox.append("params", key="job", params={k: str(v) for k, v in params.items() if v is not None})
    datasets = [dashboard.dataset(n, records, scope, len(data.label_names))
                for n, records in zip(data.institutions, data.train)]
    outbox.append("inputs", key="job", datasets=datasets)
    for name, records, dataset in zip(data.institutions, data.train, datasets):
        outbox.append("run", key=f"institution:{name}", parent="job", experiment=data.task,
                      name=name, tags={"fedseek.institution": name})
        outbox.append("params", key=f"institution:{name}", params={"records": len(records)})
        outbox.append("inputs", key=f"institution:{name}", datasets=[dataset])


def round_metrics(outbox: Outbox, row: dict) -> None:
    """One committed round: the job's accuracy/loss/bytes (causal-lm: perplexity, exact match, ROUGE-L and
    a table of generation samples) and each institution's ε, σ, q, steps."""
    step = int(row["round"])
    metrics = {k: row.get(k) for k in ("accuracy", "loss", "train_loss", "bytes_up", *GENERATION_METRICS) if k in row}
    metrics.update({f"epsilon/{c['institution']}": c.get("epsilon") for c in row.get("clients", [])})
    outbox.append("metrics", key="job", step=step, metrics=finite(metrics))
    if row.get("samples"):  # causal-lm: what the global adapter answers, a table per round
        columns = {k: [s[k] for s in row["samples"]] for k in ("prompt", "reference", "generated")}
        outbox.append("table", key="job", artifact_file=f"samples/round_{step:03d}.json",
                      data={"round": [step] * len(row["samples"]), **columns})
    for client in row.get("clients", []):
        outbox.append("metrics", key=f"institution:{client['institution']}", step=step,
                      metrics=finite({k: client.get(k) for k in CLIENT_METRICS}))


def privacy_summary(outbox: Outbox, report: dict, db_url: str, job_id: int, scope: str) -> None:
    """The finished job's description (ε this job, lifetime ε spent / budget per institution) and
    each charged institution's step in the privacy experiment's budget view."""
    budgets = budget(outbox, db_url, report["institutions"] if report.get("epsilon") else [], job_id)
    text = dashboard.privacy_summary(report, budgets, report.get("dp_noise", ""), scope)
    outbox.append("tags", key="job", tags={dashboard.DESCRIPTION: text})


def budget(outbox: Outbox, db_url: str, institutions: list[str], job_id: int) -> dict[str, tuple[float, float]]:
    """Journal each institution's lifetime ε (spent, budget) from the ledger after job `job_id`."""
    from sqlalchemy import select

    from fedseek.platform.store.db import Institution

    budgets = {}
    with session_scope(db_url) as session:
        for row in session.scalars(select(Institution).where(Institution.name.in_(list(institutions)))):
            budgets[row.name] = (ledger.spent(session, row), row.epsilon_max)
    for name, (spent, limit) in sorted(budgets.items()):
        outbox.append("budget", institution=name, epsilon_spent=spent, epsilon_max=limit, step=job_id)
    return budgets


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
