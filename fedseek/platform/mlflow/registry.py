"""Model registry: one registered model per task, every job's adapter a new version with alias
`candidate`; `champion` moves only through the promotion gate, and every decision is recorded
(MLflow version tags + the platform DB) with its reason, and shown in the version's description."""
from __future__ import annotations

import json
from dataclasses import dataclass

from sqlalchemy import select

from fedseek.platform.mlflow.dashboard import version_description
from fedseek.platform.store.db import AdapterVersion, Institution, PromotionDecision, session_scope


def model_name(task: str) -> str:
    return f"fedseek-{task}"


GENERATION_TAGS = {"perplexity": "final_perplexity", "exact_match": "final_exact_match", "rouge_l": "final_rouge_l"}


def version_tags(report: dict, job_id: int, scope: str) -> dict:
    """The tags a registered adapter version carries: accuracy, privacy figures, recipe, lineage."""
    tags = {"accuracy": report["final_accuracy"], "job_id": job_id,
            "epsilon": json.dumps({k: round(v, 4) for k, v in (report.get("epsilon") or {}).items()}),
            "delta": report.get("delta"), "sigma": report.get("noise_multiplier"), "q": report.get("sampling_rate"),
            "steps": report.get("steps"), "clip": report.get("clip_norm"), "lora_rank": report.get("lora_rank"),
            "base_model_sha256": report.get("base_model_sha256"), "data_scope": scope,
            "dp_noise": report.get("dp_noise")}
    cl = report.get("cl") or {}  # `cl_summary`: forgetting and BWT are None for a joint arm (one row)
    tags["forgetting"], tags["bwt"] = cl.get("forgetting"), cl.get("bwt")
    # what `accuracy` measures (classify: accuracy; causal-lm: exact match or ROUGE-L) and the
    # causal-lm figures beside it; `fedseek generate` refuses a version whose objective is classify
    tags["objective"], tags["score_metric"] = report.get("objective"), report.get("score_metric")
    for tag, key in GENERATION_TAGS.items():
        tags[tag] = report.get(key)
    return {k: v for k, v in tags.items() if v is not None}


def register(client, name: str, run_id: str, artifact_path: str, tags: dict) -> str:
    """New version of `name` from the run's `artifact_path`, aliased `candidate`; its version."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="FedSeek PEFT adapters of this task")
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    tags = {k: str(v) for k, v in tags.items()}
    version = client.create_model_version(name, source, run_id=run_id, tags=tags, description=version_description(tags))
    client.set_registered_model_alias(name, "candidate", version.version)
    return str(version.version)


def record_version(db_url: str, adapter_version_id: int, name: str, version: str) -> None:
    with session_scope(db_url) as session:
        row = session.get(AdapterVersion, adapter_version_id)
        row.mlflow_model, row.mlflow_version = name, version


@dataclass
class Limits:
    max_forgetting: float = 0.05
    min_bwt: float = -0.05


def gate(candidate: dict, champion: dict | None, over_budget: list[str], limits: Limits) -> tuple[bool, str]:
    """(promote?, reason). `candidate`/`champion`: version tags (accuracy, forgetting, bwt)."""
    accuracy = float(candidate["accuracy"])
    if over_budget:
        return False, f"privacy budget exceeded by {', '.join(over_budget)}"
    if "forgetting" in candidate and float(candidate["forgetting"]) > limits.max_forgetting:
        return False, f"forgetting {float(candidate['forgetting']):.4f} > limit {limits.max_forgetting:g}"
    if "bwt" in candidate and float(candidate["bwt"]) < limits.min_bwt:
        return False, f"BWT {float(candidate['bwt']):.4f} < limit {limits.min_bwt:g}"
    metric = candidate.get("score_metric") or "accuracy"  # causal-lm: accuracy is exact_match or rouge_l
    if champion is None:
        return True, f"first version ({_score(metric)} {accuracy:.4f}); no champion yet"
    best = float(champion["accuracy"])
    if (champion.get("score_metric") or metric) != metric:  # the champion's accuracy measured another score
        if metric not in candidate or metric not in champion:
            return False, (f"{_score(metric)} is not comparable with the champion's accuracy "
                           f"({_score(champion['score_metric'])})")
        accuracy, best = float(candidate[metric]), float(champion[metric])
    if accuracy < best:
        return False, f"{_score(metric)} {accuracy:.4f} < champion's {best:.4f}"
    return True, f"{_score(metric)} {accuracy:.4f} >= champion's {best:.4f}"


def _score(metric: str) -> str:
    """How a gate reason names the compared score: `accuracy`, or the causal-lm score it stands for."""
    return {"exact_match": "exact match", "rouge_l": "ROUGE-L"}.get(metric, "accuracy")


def _over_budget(db_url: str, institutions) -> list[str]:
    """Institutions whose lifetime epsilon in the ledger exceeds their budget."""
    from fedseek.platform.store.ledger import spent

    with session_scope(db_url) as session:
        rows = session.scalars(select(Institution).where(Institution.name.in_(list(institutions)))).all()
        return [f"{i.name} (epsilon {spent(session, i):.3f} > {i.epsilon_max:g})" for i in rows
                if spent(session, i) > i.epsilon_max + 1e-9]


def promote(client, name: str, version: str, db_url: str, limits: dict | None = None) -> tuple[bool, str]:
    """Gate `version` against the current champion; move `champion` if it passes; record why."""
    from mlflow.exceptions import MlflowException

    candidate = client.get_model_version(name, version).tags
    try:
        current = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        current = None
    epsilons = json.loads(candidate.get("epsilon", "{}") or "{}")
    if current is not None and current.version == str(version):
        ok, reason = True, "already champion"
    else:
        ok, reason = gate(candidate, current.tags if current else None, _over_budget(db_url, epsilons),
                          Limits(**(limits or {})))
    if ok:
        client.set_registered_model_alias(name, "champion", version)
    client.set_model_version_tag(name, version, "promotion", "champion" if ok else "rejected")
    client.set_model_version_tag(name, version, "promotion_reason", reason)
    decided = {**candidate, "promotion": "champion" if ok else "rejected", "promotion_reason": reason}
    client.update_model_version(name, version, description=version_description(decided))
    with session_scope(db_url) as session:
        session.add(PromotionDecision(model_name=name, version=str(version), promoted=ok, reason=reason))
    return ok, reason


def versions(client, name: str) -> list[dict]:
    """Every version of `name`, newest first, with aliases and the tags the gate reads."""
    aliases: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for v in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: -int(v.version)):
        rows.append({"version": str(v.version), "aliases": sorted(aliases.get(str(v.version), [])), "run_id": v.run_id,
                     "accuracy": v.tags.get("accuracy"), "epsilon": v.tags.get("epsilon"),
                     "promotion": v.tags.get("promotion", "pending"),
                     "reason": v.tags.get("promotion_reason", ""), "source": v.source})
    return rows


def task_models(client) -> list[str]:
    """The registered model of every task (`fedseek-<task>`), by name."""
    prefix = model_name("")
    return sorted(m.name for m in client.search_registered_models(f"name LIKE '{prefix}%'"))


def download(client, name: str, alias: str, destination: str) -> str:
    """Download the adapter directory of `name@alias`; returns its local path."""
    return download_version(client, client.get_model_version_by_alias(name, alias), destination)


def download_version(client, version, destination: str) -> str:
    """Download the adapter directory of a `ModelVersion` (its source); returns its local path."""
    import mlflow

    return mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=destination,
                                               tracking_uri=client._tracking_client.tracking_uri)
