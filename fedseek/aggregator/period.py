"""One federated job around the round loop: the plain job, and every period of a continual run.

`run_period` opens the job with the reporter, runs `rounds.run_rounds` scoring (and so committing)
every round on the server's test split, gives its `PeriodHooks` the last adapter (a continual
sequence adds the Fisher round, EWC consolidation and its accuracy-matrix row there), builds the
report and writes report.json with `write_report`, the one writer of report.json.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from fedseek.aggregator.reply_trust import Plans, ReplyTrust
from fedseek.aggregator.rounds import Reporter, run_rounds
from fedseek.aggregator.strategy import AdapterFedAvg
from fedseek.config import JobConfig
from fedseek.data.tasks import FederatedData
from fedseek.models.adapted import AdaptedModel
from fedseek.models.loading import base_model_bytes, base_model_hash, resolve_base
from fedseek.models.lora import load_trainable_state
from fedseek.privacy.randomness import noise_label
from fedseek.wire.arrays import to_tensors


@dataclass
class Period:
    """One federated job as the coordinator runs it: the job, its data as reported (the census view
    in deployment), the server's model and encoded test split (None: nothing to score each round,
    e.g. a joint period), the adapter it starts from and that adapter's score, node id ->
    institution, the reply checks and the train-message config. `done`/`rows`: rounds committed
    before an interruption (resume); `started`: when the job began (the report's clock)."""

    job: JobConfig
    data: FederatedData
    classifier: AdaptedModel
    test: object | None
    arrays: ArrayRecord
    initial: dict
    nodes: dict[int, str]
    trust: ReplyTrust
    train_config: ConfigRecord
    started: float
    done: int = 0
    rows: list[dict] = field(default_factory=list)
    resumed: bool = False


class PeriodHooks:
    """What a sequence of periods adds around one job's rounds; these defaults are the plain job."""

    def before_period(self, period: Period) -> dict[str, ArrayRecord] | None:
        """Records sent with every train message besides the adapter (continual: the EWC state)."""
        return None

    def after_period(self, period: Period, final: ArrayRecord, round_log: dict[int, list[dict]],
                     stopped: str | None) -> dict:
        """Called with the server's model holding `final` (the last committed adapter); returns keys
        added to the report (continual: Fisher round, consolidation, accuracy-matrix row)."""
        return {}


def run_period(grid: Grid, period: Period, reporter: Reporter,
               hooks: PeriodHooks | None = None) -> tuple[ArrayRecord, dict, str | None]:
    """Rounds done+1..job.federation.rounds of `period`; returns the last committed adapter, the
    report (also in `out/report.json`, then given to `reporter.finish`) and, if the reporter ended
    the job early, its stop reason."""
    hooks = hooks or PeriodHooks()
    job, model, rows, done = period.job, period.classifier, period.rows, period.done
    extra = hooks.before_period(period)
    reporter.start(job, period.data, period.initial)
    strategy = AdapterFedAvg(job.federation.institutions, job.compression, extra_records=extra, robust=job.robust,
                             node_names=period.nodes, min_institutions=job.federation.min_institutions,
                             rejoin_wait=job.federation.rejoin_wait, trust=period.trust)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 or period.test is None:
            return None
        tensors = to_tensors(arrays)
        load_trainable_state(model.model, tensors)
        evaluation = model.evaluate(period.test)
        rows.append(round_row(done + server_round, evaluation, strategy.round_log.get(server_round, []),
                              period.started))
        if samples := model.evaluation_samples(period.test):  # causal-lm: what the global adapter says
            rows[-1]["samples"] = samples
        if strategy.dropped_log.get(server_round):
            rows[-1]["dropped"] = strategy.dropped_log[server_round]
        if strategy.aggregate_log.get(server_round):
            rows[-1]["aggregate_rejected"] = strategy.aggregate_log[server_round]
        # the global adapter of this round (e.g. on disk) before the round is committed
        reporter.checkpoint(done + server_round, {k: v.numpy() for k, v in tensors.items()})
        reporter.round(rows[-1])
        return MetricRecord(evaluation)

    final, stopped, round_log = period.arrays, None, strategy.round_log
    if job.federation.rounds > done:  # `final`: the last committed round's adapter, also if stopped early
        final, stopped = run_rounds(strategy, grid, period.arrays, job.federation.rounds - done,
                                    period.train_config, evaluate, reporter, timeout=job.federation.round_timeout)
    else:  # every round was committed before an interruption: only the report is left
        round_log = {done: rows[-1]["clients"]} if rows else {}
    load_trainable_state(model.model, to_tensors(final))
    extras = hooks.after_period(period, final, round_log, stopped)
    report = build_report(job, period.data, model, period.initial, rows, round_log, period.started)
    report.update(extras)
    if period.resumed:
        report["resumed_after_round"] = done
    if stopped:
        report["stopped"] = stopped
    write_report(Path(job.federation.out), report)
    reporter.finish(report)
    return final, report, stopped


def reply_trust(job: JobConfig, data: FederatedData, nodes: dict[int, str], done: int = 0) -> ReplyTrust:
    """What the coordinator knows of each bound node: its institution's record count in `data`
    (census counts in deployment, the server's own split in simulation) and, with DP, its plan."""
    counts = {name: len(rows) for name, rows in zip(data.institutions, data.train)}
    records = {node: counts[name] for node, name in nodes.items() if name in counts}
    return ReplyTrust(records, Plans(job, records) if job.privacy.enabled else None, done)


def round_row(server_round: int, evaluation: dict, clients: list[dict], started: float) -> dict:
    """One committed round as the reporter and report.json show it."""
    return {"round": server_round, "accuracy": evaluation["accuracy"], "loss": evaluation["loss"],
            **{k: evaluation[k] for k in GENERATION_METRICS if k in evaluation},
            "train_loss": float(np.mean(losses)) if (losses := [c["train_loss_last"] for c in clients
                                                                 if "rejected" not in c]) else math.nan,
            "bytes_up": int(sum(c["bytes_up"] for c in clients)),
            "epsilon": {c["institution"]: c.get("epsilon") for c in clients},
            "elapsed_s": round(time.time() - started, 1), "clients": clients}


GENERATION_METRICS = ("perplexity", "exact_match", "rouge_l")  # causal-lm evaluations add these


def generation_summary(initial: dict, rows: list[dict]) -> dict:
    """causal-lm report keys: initial_perplexity and final_perplexity/exact_match/rouge_l."""
    if "perplexity" not in initial:
        return {}
    last = rows[-1] if rows else initial
    return {"initial_perplexity": initial["perplexity"], "initial_exact_match": initial.get("exact_match"),
            "initial_rouge_l": initial.get("rouge_l"),
            **{f"final_{k}": last.get(k) for k in GENERATION_METRICS}}


def write_report(out: Path, report: dict) -> None:
    """`out/report.json`: every report (plain job, period, continual summary) is written here."""
    (Path(out) / "report.json").write_text(json.dumps(report, indent=2))


def build_report(job: JobConfig, data: FederatedData, classifier: AdaptedModel,
                 initial: dict, rows: list[dict], round_log: dict[int, list[dict]], started: float) -> dict:
    """The job's report; saves the classifier's adapter (PEFT format, with labels.json) in `out/adapter`."""
    out = Path(job.federation.out)
    adapter_dir = out / "adapter"
    classifier.model.save_pretrained(adapter_dir)
    (adapter_dir / "labels.json").write_text(json.dumps(data.label_names))
    if job.data.causal_lm:
        classifier.save_settings(adapter_dir)  # generation.json: prompt length and answer tokens
    final_clients = {c["institution"]: c for c in round_log.get(max(round_log, default=0), [])}
    dp = job.privacy.enabled
    per_site = lambda key: {n: c.get(key) for n, c in final_clients.items()}  # noqa: E731
    model = classifier.model
    return {
        "task": data.task, "institutions": data.institutions,
        "train_examples": {n: len(t) for n, t in zip(data.institutions, data.train)},
        "test_examples": len(data.test), "num_labels": len(data.label_names),
        "dp": dp, "dp_noise": noise_label(dp, job.privacy.reproducible_noise),
        "initial_accuracy": initial["accuracy"], "initial_loss": initial["loss"],
        "final_accuracy": rows[-1]["accuracy"] if rows else initial["accuracy"],
        "final_loss": rows[-1]["loss"] if rows else initial["loss"], "rounds": rows,
        "epsilon": per_site("epsilon") if dp else None,
        "epsilon_rdp": per_site("epsilon_rdp") if dp else None,
        "target_epsilon": job.privacy.target_epsilon if dp else None,
        "delta": max(per_site("delta").values(), default=None),
        "noise_multiplier": min(per_site("noise_multiplier").values(), default=None) if dp else 0.0,
        "sampling_rate": max(per_site("sample_rate").values(), default=None),
        "steps": int(max(per_site("steps").values(), default=0)),
        "clip_norm": job.privacy.clip_norm if dp else None,
        "lora_rank": job.lora.rank, "ffa": job.lora.ffa,
        "adapter_bytes": sum(p.stat().st_size for p in adapter_dir.glob("*.safetensors")),
        "bytes_up_per_round": int(np.mean([sum(c["bytes_up"] for c in v) for v in round_log.values()]))
        if round_log else 0,
        "base_model": str(resolve_base(job.federation.base_model)),
        "base_model_sha256": base_model_hash(job.federation.base_model),
        "base_model_bytes": base_model_bytes(job.federation.base_model),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
        "adapter_dir": str(adapter_dir), "wall_seconds": round(time.time() - started, 1),
        "config": job.to_flat(), "objective": "causal-lm" if job.data.causal_lm else "classify",
        "score_metric": classifier.score_metric,  # what `accuracy` measures
        **generation_summary(initial, rows),
    }
