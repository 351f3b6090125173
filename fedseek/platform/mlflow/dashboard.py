"""What the MLflow UI shows an admin: run names and descriptions (the privacy summary), dataset
inputs per institution (counts and digests, never records), the "privacy" experiment with one
run per institution whose `epsilon_spent` steps with each job, and version descriptions. The
text is built here from journalled values; `tracking._apply` sends it."""
from __future__ import annotations

import hashlib
import json

# the UI's experiment kind: a model-training experiment, not a GenAI app (its sidebar, tabs)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
BUDGET_EXPERIMENT = "privacy"
DESCRIPTION = "mlflow.note.content"  # the run/experiment description the UI renders as markdown


def run_name(task: str, institutions: int, privacy, job_id: int, period: str = "all") -> str:
    """`banking77 · 3 institutions · ε 4 · job 7` (a continual period after the task)."""
    if not privacy.enabled:
        dp = "no DP"
    elif privacy.noise_multiplier is not None:  # σ given directly: ε follows from it
        dp = f"σ {privacy.noise_multiplier:g}"
    else:
        dp = f"ε {privacy.target_epsilon:g}"
    if privacy.enabled and privacy.reproducible_noise:
        dp += " NOT PRIVATE"
    where = task if period == "all" else f"{task} · period {period}"
    return f"{where} · {institutions} institution{'s' * (institutions != 1)} · {dp} · job {job_id}"


def planned_summary(job, noise: str, scope: str) -> str:
    """The description of a job run before it has trained: what it will release."""
    p, o = job.privacy, job.optim
    if not p.enabled:
        return f"**No differential privacy** (DP noise: {noise}): not charged.\n\nData scope: `{scope}`"
    target = f"σ {p.noise_multiplier:g}" if p.noise_multiplier is not None else f"target ε {p.target_epsilon:g}"
    delta = "min(1e-5, 0.01/N)" if p.delta is None else f"{p.delta:g}"
    return (f"**Privacy** (DP noise: {noise}): {target} per institution for this job, δ {delta}, "
            f"clip C {p.clip_norm:g}, q {o.batch_fraction:g}, {job.federation.rounds} rounds × "
            f"{o.local_steps} local steps. Running…\n\nData scope: `{scope}`")


def privacy_summary(report: dict, budgets: dict[str, tuple[float, float]], noise: str, scope: str) -> str:
    """Markdown: per institution ε of this job, lifetime ε spent / budget, σ, q, steps; δ; noise."""
    if not report.get("dp", True) or not report.get("epsilon"):
        return f"**No differential privacy** (DP noise: {noise}): not charged.\n\nData scope: `{scope}`"
    last = {c["institution"]: c for row in report.get("rounds") or [] for c in row.get("clients", [])}
    lines = [f"**Privacy** · DP noise: **{noise}** · δ {report.get('delta', 0):g}", "",
             "| institution | ε this job | ε spent (lifetime) / budget | σ | q | steps |",
             "|---|---|---|---|---|---|"]
    for name, eps in sorted(report["epsilon"].items()):
        spent, limit = budgets.get(name, (float("nan"), float("nan")))
        c = last.get(name, {})
        lines.append(f"| {name} | {eps:.3f} | {spent:.3f} / {limit:g} | {_num(c.get('noise_multiplier'))} | "
                     f"{_num(c.get('sample_rate'))} | {c.get('steps', '-')} |")  # steps: cumulative
    return "\n".join(lines + ["", f"Data scope: `{scope}`"])


def _num(value) -> str:
    return "-" if value is None else f"{float(value):.4g}"


def dataset(name: str, records, scope: str, label_count: int) -> dict:
    """The journalled dataset input of one institution: name, digest, source (the data scope) and
    a profile of counts. A deployed job's coordinator holds only the census count: its digest is
    of (scope, name, count) and the label count is unknown."""
    digest = hashlib.sha256(f"{scope}\n{name}\n{len(records)}".encode())
    labels = getattr(records, "labels", None)
    profile = {"records": len(records)}
    if labels is not None:
        for text, label in zip(records.texts, labels):
            digest.update(f"\n{int(label)}\t{text}".encode())
        profile["labels"] = len(set(int(x) for x in labels))
    profile["task_labels"] = label_count
    return {"name": name, "digest": digest.hexdigest()[:12], "source": scope, "profile": profile,
            "context": "training"}


def log_datasets(client, run_id: str, datasets: list[dict]) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = [DatasetInput(Dataset(d["name"], d["digest"], "fedseek", json.dumps({"data_scope": d["source"]}),
                                   profile=json.dumps(d["profile"])),
                           [InputTag("mlflow.data.context", d.get("context", "training"))]) for d in datasets]
    client.log_inputs(run_id, datasets=inputs)


def log_budget(client, experiment_id: str, op: dict) -> None:
    """One job's step of an institution's lifetime budget in the privacy experiment: its run (found
    by tag, created once) gets epsilon_spent, epsilon_max, epsilon_remaining and
    budget_used (spent / max) at step = job id."""
    from mlflow.entities import Metric

    name = op["institution"]
    runs = client.search_runs([experiment_id], f"tags.`fedseek.institution` = '{name}'", max_results=1)
    run_id = runs[0].info.run_id if runs else client.create_run(
        experiment_id, start_time=op.get("timestamp_ms"), run_name=name,
        tags={"fedseek.institution": name}).info.run_id
    spent, limit = float(op["epsilon_spent"]), float(op["epsilon_max"])
    stamp, step = int(op["timestamp_ms"]), int(op["step"])
    values = {"epsilon_spent": spent, "epsilon_max": limit, "epsilon_remaining": max(limit - spent, 0.0),
              "budget_used": spent / limit if limit > 0 else 0.0}
    client.log_batch(run_id, metrics=[Metric(k, v, stamp, step) for k, v in values.items()])
    client.set_tag(run_id, DESCRIPTION, f"**{name}**: lifetime ε {spent:.3f} of its budget {limit:g} spent "
                                        f"({values['budget_used']:.0%}) after job {step}; "
                                        f"{values['epsilon_remaining']:.3f} left.")
    client.set_terminated(run_id, "FINISHED", end_time=stamp)


SCORES = {"exact_match": "exact match", "rouge_l": "ROUGE-L"}  # what a causal-lm version's accuracy is


def version_description(tags: dict) -> str:
    """Markdown of a registered version: promotion decision and reason first, then accuracy (for a
    causal-lm version: its score, exact match or ROUGE-L, with perplexity beside it), ε per
    institution (δ, σ, q, steps), forgetting/BWT where continual, job and data scope."""
    decision = tags.get("promotion")
    # plain text first: the registry's version list shows only the start of it
    head = (f"{'Promoted to champion' if decision == 'champion' else 'NOT promoted'}: "
            f"{tags.get('promotion_reason', '')}" if decision else "Promotion pending (candidate)")
    eps = json.loads(tags.get("epsilon") or "{}")
    privacy = ", ".join(f"{k} {float(v):.3f}" for k, v in sorted(eps.items())) or "no DP"
    generative = tags.get("objective") == "causal-lm"
    score = f"Score ({SCORES.get(tags.get('score_metric'), 'accuracy')})" if generative else "Accuracy"
    lines = [head, f"{score} **{float(tags['accuracy']):.2%}** · ε {privacy}"
                   + (f" · DP noise: {tags['dp_noise']}" if tags.get("dp_noise") else "")]
    if generative:
        lines.append(generation_figures(tags))
    names = {"delta": "δ", "sigma": "σ", "q": "q", "steps": "steps"}
    figures = [f"{names[k]} {tags[k]}" for k in names if tags.get(k) not in (None, "")]
    if figures:
        lines.append(", ".join(figures))
    if tags.get("forgetting") not in (None, ""):
        lines.append(f"Forgetting {float(tags['forgetting']):.4f} · BWT {float(tags.get('bwt') or 0):.4f}")
    lines.append(f"Job {tags.get('job_id', '-')} · data scope `{tags.get('data_scope', '-')}`")
    return "\n\n".join(lines)


def generation_figures(tags: dict) -> str:
    """A causal-lm version's perplexity, exact match and ROUGE-L, and what its `accuracy` is."""
    figures = [f"{name} {fmt.format(float(tags[key]))}" for key, name, fmt in
               (("perplexity", "perplexity", "{:.3f}"), ("exact_match", "exact match", "{:.2%}"),
                ("rouge_l", "ROUGE-L", "{:.4f}")) if tags.get(key) not in (None, "")]
    return (f"Generative adapter (causal-lm): {' · '.join(figures) or 'no generation figures'}. Its "
            "`accuracy` tag, which the promotion gate compares with the champion's, is the task's score: "
            "exact match for short label-like answers, ROUGE-L for free-text answers "
            f"(here: {SCORES.get(tags.get('score_metric'), 'unknown')}). Answers: `fedseek generate`.")
