"""Continual learning on the ServerApp: a loop over data periods, in one Flower run, around the
same federated job as a plain run (`period.run_period`); `SequenceHooks` add what a sequence needs.

The global adapter carries over from period to period. With EWC, after each period but the last
every institution returns its DP Fisher diagonal at the global adapter (`train.fisher`); the
server aggregates them (example-weighted, FedCurv-style), normalises, consolidates them with the
anchor θ* and ships both with every later period's train messages (`ewc` record). After each period
the global adapter is scored on every period's test split: the accuracy matrix a[i][j].

`compare` runs further methods (e.g. naive, joint) in the same run as further arms; `tune` picks λ
from candidates on the institutions' validation splits of the first two periods (never the test
set) before the main arm runs. Every arm's period jobs go through the reporter like any job (with
platform tracking: pre-flight and ledger, charged to the same institutions), and noised
validation counts are charged too (`validation_reply`, `PlatformReporter.charge_counts`).
"""
from __future__ import annotations

import copy
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedseek.aggregator.period import Period, PeriodHooks, reply_trust, run_period, write_report
from fedseek.aggregator.reply_trust import ReplyTrust, fisher_reply
from fedseek.aggregator.robust import update_byte_limit
from fedseek.aggregator.rounds import Reporter, SilentReporter
from fedseek.aggregator.server_app import census
from fedseek.aggregator.strategy import reply_origin
from fedseek.config import PERIOD_SEPARATOR, JobConfig
from fedseek.continual.ewc import EWCState, consolidate, normalise_fisher
from fedseek.continual.fisher import restrict_rows, weighted_fisher
from fedseek.continual.report import cl_summary, heatmap_png
from fedseek.data.plan import job_data, period_names
from fedseek.models.adapted import adapted_model, encode_rows
from fedseek.models.lora import load_trainable_state, trainable_state
from fedseek.wire.arrays import to_arrays, to_record, to_tensors
from fedseek.wire.replies import ReplyError, ValidationReply

logger = logging.getLogger("fedseek")


class SequenceHooks(PeriodHooks):
    """What a continual sequence adds to each period's job: the EWC state (Fisher, anchor) shipped
    with every train message; after the rounds, the DP Fisher round at the period's adapter and
    its consolidation into the state, and (with `matrix`) the adapter's accuracy on every
    period's test split, appended as a row of the accuracy matrix."""

    def __init__(self, runner: "ContinualRunner", state: EWCState, matrix: list[list[float]] | None = None):
        self.runner, self.state, self.matrix = runner, state, matrix

    def before_period(self, period: Period) -> dict[str, ArrayRecord] | None:
        uses = period.job.ewc.uses_fisher and len(self.state)
        return {"ewc": to_record(self.state.to_flat())} if uses else None

    def after_period(self, period: Period, final: ArrayRecord, round_log: dict[int, list[dict]],
                     stopped: str | None) -> dict:
        job, runner = period.job, self.runner
        extras = {"period": job.data.period, "data_scope": job.data.period_scope}
        if stopped:
            return {**extras, "fisher": []}
        epsilon = {e["institution"]: e.get("epsilon") for e in round_log.get(job.federation.rounds, [])}
        fisher, fisher_log = None, []
        if job.ewc.fisher_after:
            fisher, fisher_log = runner.federated_fisher(final, period.train_config, period.trust, job)
            epsilon.update({e["institution"]: e["epsilon"] for e in fisher_log if "epsilon" in e})
        if fisher is not None:
            if period.data.active_labels is not None:
                heads = [n for n, t in fisher.items()
                         if "modules_to_save" in n and t.shape[0] == len(runner.label_names)]
                fisher = restrict_rows(fisher, heads, list(period.data.active_labels))
            self.state = consolidate(self.state, normalise_fisher(fisher), to_tensors(final), job.ewc)
        extras.update(fisher=fisher_log, epsilon=epsilon if job.privacy.enabled else None)
        if self.matrix is not None:  # the server's model holds `final`
            self.matrix.append([runner.classifier.evaluate(runner.tests[p])["accuracy"] for p in runner.periods])
            if len(self.matrix) == len(runner.periods) or job.ewc.method == "joint":
                extras["cl"] = cl_summary(self.matrix, runner.periods, job.ewc.method,
                                          job.ewc.lam if job.ewc.uses_fisher else None)
        return extras


class ContinualRunner:
    """Runs period sequences for one task on one grid, sharing the server's model and test sets."""

    def __init__(self, grid: Grid, job: JobConfig, reporter: Reporter | None = None):
        self.grid, self.job, self.reporter = grid, job, reporter or SilentReporter()
        self.periods = period_names(job)
        every = job_data(job, PERIOD_SEPARATOR.join(self.periods))
        self.label_names = every.label_names
        self.classifier = adapted_model(job, len(self.label_names))
        self.tests = {}
        for name in self.periods:
            data = job_data(job, name)
            self.tests[name] = encode_rows(self.classifier, data.test, data.active_labels)
        self.initial = to_record(trainable_state(self.classifier.model))
        # node id -> institution, bound once by a census (names and counts checked against the split)
        first = copy.deepcopy(job)
        first.data.period = self.periods[0]
        first_data = job_data(first)
        self.nodes = {node: name for name, node in census(grid, first, expected=first_data,
                                                          config=self.message_config(first, first_data))[1].items()}

    # -- one period ---------------------------------------------------------------------------
    def period_job(self, method: str, names: list[str], lam: float, fisher_after: bool,
                   study: str, out: Path) -> JobConfig:
        job = copy.deepcopy(self.job)
        job.data.period = PERIOD_SEPARATOR.join(names)
        job.ewc.method, job.ewc.lam, job.ewc.fisher_after = method, lam, fisher_after
        job.federation.study, job.federation.out = study, str(out)
        return job

    def train_period(self, job: JobConfig, arrays: ArrayRecord, state: EWCState,
                     matrix: list[list[float]] | None = None) -> dict:
        """One period's federated job (`period.run_period` with this sequence's hooks). With
        `matrix` (the rows so far), the adapter is scored on every period and the row appended;
        the last period's report then carries the `cl` block."""
        started = time.time()
        data = job_data(job)
        test = self.tests.get(job.data.period)
        load_trainable_state(self.classifier.model, to_tensors(arrays))
        initial = self.classifier.evaluate(test) if test else {"accuracy": float("nan"), "loss": float("nan")}
        period = Period(job, data, self.classifier, test, arrays, initial, self.nodes,
                        reply_trust(job, data, self.nodes), self.message_config(job, data), started)
        hooks = SequenceHooks(self, state, matrix)
        final, report, stopped = run_period(self.grid, period, self.reporter, hooks)
        # stopped (a budget would be exceeded): the sequence ends cleanly, the period is not carried over
        return {"arrays": arrays if stopped else final, "state": hooks.state, "report": report,
                "seconds": time.time() - started, "stopped": stopped}

    def message_config(self, job: JobConfig, data) -> ConfigRecord:
        """What institutions need to rebuild the job: its flat config, the label names and, in a
        task-incremental period, the active labels."""
        config = {**job.to_flat(), "label-names": list(self.label_names)}
        if data.active_labels is not None:
            config["active-labels"] = list(data.active_labels)
        return ConfigRecord(config)

    def federated_fisher(self, arrays: ArrayRecord, config: ConfigRecord, trust: ReplyTrust,
                         job: JobConfig) -> tuple[dict | None, list[dict]]:
        """Every bound institution's DP Fisher diagonal at `arrays`, aggregated by (capped) examples.
        A bad reply is left out with its reason in the log (its privacy claims still charged, no
        less than the plan); None if no reply was usable (the period is then not consolidated)."""
        messages = [Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=node,
                            message_type="train.fisher") for node in self.grid.get_node_ids() if node in self.nodes]
        origin, reference = reply_origin(messages), to_arrays(arrays)
        limit = update_byte_limit(job.robust, reference)
        fishers, weights, log = [], [], []
        for reply in self.grid.send_and_receive(messages):
            entry, fisher = fisher_reply(reply, origin(reply), self.nodes, trust, reference, limit)
            log.append(entry)
            if fisher is None:
                logger.warning("Fisher reply of %s (node %s) left out: %s", entry["institution"], entry["node_id"],
                               entry["rejected"])
            else:
                fishers.append({k: torch.from_numpy(np.array(v)) for k, v in fisher.items()})
                weights.append(entry["num_examples"])
        if not fishers:
            logger.error("no usable Fisher reply: the period is not consolidated (%s)",
                         "; ".join(f"{e['institution']}: {e['rejected']}" for e in log) or "no replies")
            return None, sorted(log, key=lambda e: e["institution"])
        return weighted_fisher(fishers, weights), sorted(log, key=lambda e: e["institution"])

    def validate(self, arrays: ArrayRecord, job: JobConfig, period: str) -> float:
        """Accuracy on the institutions' validation records of `period` (pooled counts)."""
        pjob = copy.deepcopy(job)
        pjob.data.period = period
        data = job_data(pjob)
        content = RecordDict({"arrays": arrays, "config": self.message_config(pjob, data)})
        bound = getattr(self, "nodes", None)  # node id -> institution, when bound by a census
        messages = [Message(content, dst_node_id=node, message_type="evaluate.validation")
                    for node in self.grid.get_node_ids() if bound is None or node in bound]
        correct = total = 0.0
        releases = []
        for reply in self.grid.send_and_receive(messages):
            if not reply.has_error():
                name = bound.get(reply.metadata.src_node_id) if bound is not None else None
                counts, release = validation_reply(reply, name)
                if counts is not None:
                    correct, total = correct + counts[0], total + counts[1]
                releases += [release] if release else []
        if releases:
            self.reporter.charge_counts(pjob, releases)  # the platform ledger, if tracked
        return min(max(correct / total, 0.0), 1.0) if total > 0 else float("nan")

    # -- sequences ----------------------------------------------------------------------------
    def run_arm(self, method: str, lam: float, study: str, out: Path) -> dict:
        """The whole period sequence for `method`; joint trains once on all periods."""
        sequence = [self.periods] if method == "joint" else [[p] for p in self.periods]
        arrays, state, matrix, reports, started = self.initial, EWCState(), [], [], time.time()
        uses_fisher = method in ("ewc", "online-ewc")
        for i, names in enumerate(sequence):
            job = self.period_job(method, names, lam, uses_fisher and i < len(sequence) - 1, study,
                                  out / f"period-{i + 1}")
            done = self.train_period(job, arrays, state, matrix)
            if done.get("stopped"):
                logger.warning("%s: %s", method, done["stopped"])
                if not matrix:
                    raise ValueError(f"{method}: {done['stopped']} (no period finished)")
                break
            arrays, state = done["arrays"], done["state"]
            reports.append({"period": job.data.period, "seconds": round(done["seconds"], 1),
                            "epsilon": done["report"]["epsilon"], "accuracy_row": matrix[-1]})
        summary = cl_summary(matrix, self.periods, method, lam if uses_fisher else None)
        epsilons = [r["epsilon"] for r in reports if r["epsilon"]]
        summary.update(periods_detail=reports, wall_seconds=round(time.time() - started, 1),
                       epsilon_max=max((v for e in epsilons for v in e.values() if v is not None), default=None),
                       final_adapter=str(out / f"period-{len(sequence)}" / "adapter"))
        heatmap_png(summary, out / "cl_heatmap.png")
        return summary

    def tune_lambda(self, candidates: list[float], out: Path) -> tuple[float, dict]:
        """λ with the best mean validation accuracy over the first two periods after training
        them with EWC; period 1 is trained once and shared by all candidates."""
        method = self.job.ewc.method
        first = self.train_period(self.period_job(method, self.periods[:1], 0.0, True, "tune",
                                                  out / "tune" / "period-1"), self.initial, EWCState())
        scores = {}
        for lam in candidates:
            job = self.period_job(method, self.periods[1:2], lam, False, f"tune-{lam:g}",
                                  out / "tune" / f"lambda-{lam:g}")
            done = self.train_period(job, first["arrays"], first["state"])
            scores[lam] = float(np.mean([self.validate(done["arrays"], job, p) for p in self.periods[:2]]))
        best = max(scores, key=lambda lam: (scores[lam], -lam))
        return best, {"candidates": candidates, "validation_acc": {f"{k:g}": v for k, v in scores.items()},
                      "chosen": best, "periods": self.periods[:2],
                      "note": "validation splits only; the tuning arms are charged to the institutions' "
                              "ledger like any job (the first two periods' records)"}


def validation_reply(reply: Message, institution: str | None = None
                     ) -> tuple[tuple[float, float] | None, dict | None]:
    """((correct, total) or None if unusable, ledger charge or None) of an `evaluate.validation`
    reply, charged to `institution` (the node's bound name; else the reply's own). Counts the site
    noised carry `noise-multiplier` (std of the Gaussian over the released counts' L2 sensitivity
    1: `correct`; `total`, like num-examples, is a disclosed count), `sample-rate`, `steps` and
    `delta`: a release, charged like any other (at sample rate 1, whatever rate the reply claims).
    Exact counts (a site policy that allows them) carry none and are not charged."""
    try:
        parsed = ValidationReply.from_message(reply)
    except ReplyError as err:  # unaccountable: neither use the counts nor guess a charge
        logger.warning("validation reply from node %s ignored: %s", reply.metadata.src_node_id, err)
        return None, None
    site = institution or parsed.institution
    if parsed.noise_multiplier is None:  # exact counts (the site's policy allows them): no release
        return parsed.counts, None
    if not site:
        logger.warning("validation reply from node %s ignored: no institution", reply.metadata.src_node_id)
        return None, None
    return parsed.counts, {"institution": site, "sigma": parsed.noise_multiplier, "delta": parsed.delta,
                           "counts": 1, "steps": parsed.steps}


def run_continual(grid: Grid, job: JobConfig, reporter: Reporter | None = None,
                  compare: tuple[str, ...] = (), tune: tuple[float, ...] = (), tune_only: bool = False) -> dict:
    """The continual job: the main method's arm (after optional λ tuning) and comparison arms."""
    started = time.time()
    out = Path(job.federation.out)
    runner = ContinualRunner(grid, job, reporter)
    lam, selection = job.ewc.lam, None
    if tune and job.ewc.uses_fisher:
        lam, selection = runner.tune_lambda(list(tune), out)
    if tune_only:
        report = {"task": job.data.task, "periods": runner.periods, "lambda_selection": selection,
                  "wall_seconds": round(time.time() - started, 1)}
        write_report(out, report)
        return report
    arms = {}
    for method in (job.ewc.method, *[m for m in compare if m != job.ewc.method]):
        arms[method] = runner.run_arm(method, lam, method if compare else "", out / method)
    main = arms[job.ewc.method]
    final = Path(main["final_adapter"])
    if (out / "adapter").exists():
        shutil.rmtree(out / "adapter")
    shutil.copytree(final, out / "adapter")
    shutil.copy(out / job.ewc.method / "cl_heatmap.png", out / "cl_heatmap.png")
    report = {"task": job.data.task, "periods": runner.periods, "dp": job.privacy.enabled,
              "target_epsilon": job.privacy.target_epsilon if job.privacy.enabled else None,
              "cl": main, "cl_compare": {m: s for m, s in arms.items() if m != job.ewc.method},
              "lambda_selection": selection, "adapter_dir": str(out / "adapter"),
              "config": job.to_flat(), "wall_seconds": round(time.time() - started, 1)}
    write_report(out, report)
    return report
