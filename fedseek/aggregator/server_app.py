"""Flower ServerApp: FedAvg over LoRA adapters with centralized evaluation on the global test set
each round; saves the final adapter in PEFT format and writes report.json.

`make_server_app(job, reporter)` is what `fedseek simulate` runs; the `flwr run` entry, which
reads the job from the run config, is `fedseek.platform.flower_app:app` (the platform composes,
the aggregator never imports it).
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedseek.aggregator.reply_trust import Plans, ReplyTrust
from fedseek.aggregator.rounds import Reporter, SilentReporter, run_rounds
from fedseek.aggregator.strategy import AdapterFedAvg, reply_origin
from fedseek.config import JobConfig
from fedseek.data.plan import federated_data
from fedseek.data.tasks import FederatedData
from fedseek.models.classifier import AdapterClassifier
from fedseek.models.loading import base_model_bytes, base_model_hash, resolve_base
from fedseek.models.lora import load_trainable_state, trainable_state
from fedseek.privacy.randomness import noise_label
from fedseek.wire.arrays import to_record, to_tensors


logger = logging.getLogger("fedseek")


def run_federation(grid: Grid, job: JobConfig, reporter: Reporter | None = None,
                   sites: FederatedData | None = None, nodes: dict[int, str] | None = None,
                   resume=None) -> dict:
    """Run the whole job on `grid` and return the report (also written to `out/report.json`).
    `sites`: the institutions as a census found them (deployment), reported instead of the
    server's own view of the data; `nodes`: node id -> institution, the only nodes that train
    (without them, i.e. in simulation, a census binds each node id to its institution first);
    `resume`: a `fedseek.platform.store.resume.ResumePoint` (rounds 1..k committed): go on from round k+1."""
    reporter = reporter or SilentReporter()
    started = time.time()
    data = federated_data(job)
    classifier = AdapterClassifier(job.federation.base_model, len(data.label_names), job.lora,
                                   job.data.max_length, pooling=job.recipe.pooling,
                                   components=job.recipe.components)
    test = classifier.encode(data.test.texts, data.test.labels)
    initial = classifier.evaluate(test)
    done = resume.committed if resume else 0  # Flower numbers this run's rounds 1..; the job's are done+1..
    if resume and resume.tensors is not None:
        load_trainable_state(classifier.model, {k: torch.from_numpy(np.array(v)) for k, v in resume.tensors.items()})
    initial_arrays = to_record(trainable_state(classifier.model))
    if nodes is None:  # simulation: bind node ids to institutions, counts checked against the split
        nodes = {node: name for name, node in census(grid, job, expected=data)[1].items()}
    trust = reply_trust(job, sites or data, nodes, done)
    reporter.start(job, sites or data, initial)
    strategy = AdapterFedAvg(job.federation.institutions, job.compression, robust=job.robust,
                             node_names=nodes, min_institutions=job.federation.min_institutions,
                             rejoin_wait=job.federation.rejoin_wait, trust=trust)
    rows: list[dict] = list(resume.rows) if resume else []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return MetricRecord(initial)
        tensors = to_tensors(arrays)
        load_trainable_state(classifier.model, tensors)
        evaluation = classifier.evaluate(test)
        rows.append(_round_row(done + server_round, evaluation, strategy.round_log.get(server_round, []), started))
        if strategy.dropped_log.get(server_round):
            rows[-1]["dropped"] = strategy.dropped_log[server_round]
        if strategy.aggregate_log.get(server_round):
            rows[-1]["aggregate_rejected"] = strategy.aggregate_log[server_round]
        # the global adapter of this round (e.g. on disk) before the round is committed
        reporter.checkpoint(done + server_round, {k: v.numpy() for k, v in tensors.items()})
        reporter.round(rows[-1])
        return MetricRecord(evaluation)

    train_config = ConfigRecord({**job.to_flat(), "label-names": list(data.label_names), "round-offset": done})
    stopped = None
    round_log = strategy.round_log
    if job.federation.rounds > done:  # `final`: the last committed round's adapter, also if stopped early
        final, stopped = run_rounds(strategy, grid, initial_arrays, job.federation.rounds - done, train_config,
                                    evaluate, reporter, timeout=job.federation.round_timeout)
        load_trainable_state(classifier.model, to_tensors(final))
    else:  # every round was committed before the interruption: only the report is left
        round_log = {done: rows[-1]["clients"]} if rows else {}
    report = build_report(job, sites or data, classifier, initial, rows, round_log, started)
    if resume:
        report["resumed_after_round"] = done
    if stopped:
        report["stopped"] = stopped
    if stopped or resume:
        (Path(job.federation.out) / "report.json").write_text(json.dumps(report, indent=2))
    reporter.finish(report)
    return report


def reply_trust(job: JobConfig, data: FederatedData, nodes: dict[int, str], done: int = 0) -> ReplyTrust:
    """What the coordinator knows of each bound node: its institution's record count in `data`
    (census counts in deployment, the server's own split in simulation) and, with DP, its plan."""
    counts = {name: len(rows) for name, rows in zip(data.institutions, data.train)}
    records = {node: counts[name] for node, name in nodes.items() if name in counts}
    return ReplyTrust(records, Plans(job, records) if job.privacy.enabled else None, done)


def _round_row(server_round: int, evaluation: dict, clients: list[dict], started: float) -> dict:
    return {"round": server_round, "accuracy": evaluation["accuracy"], "loss": evaluation["loss"],
            "train_loss": float(np.mean(losses)) if (losses := [c["train_loss_last"] for c in clients
                                                                 if "rejected" not in c]) else math.nan,
            "bytes_up": int(sum(c["bytes_up"] for c in clients)),
            "epsilon": {c["institution"]: c.get("epsilon") for c in clients},
            "elapsed_s": round(time.time() - started, 1), "clients": clients}


def build_report(job: JobConfig, data: FederatedData, classifier: AdapterClassifier,
                 initial: dict, rows: list[dict], round_log: dict[int, list[dict]], started: float) -> dict:
    out = Path(job.federation.out)
    adapter_dir = out / "adapter"
    classifier.model.save_pretrained(adapter_dir)
    (adapter_dir / "labels.json").write_text(json.dumps(data.label_names))
    final_clients = {c["institution"]: c for c in round_log.get(max(round_log, default=0), [])}
    dp = job.privacy.enabled
    per_site = lambda key: {n: c.get(key) for n, c in final_clients.items()}  # noqa: E731
    model = classifier.model
    report = {
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
        "config": job.to_flat(),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


@dataclass
class RecordCount:
    """An institution's training-record count as its census reply gave it (no records)."""

    records: int

    def __len__(self) -> int:
        return self.records


class CensusError(RuntimeError):
    """Not enough institutions connected, or one refused the census, or a census reply is unusable."""


MAX_RECORDS = 10**9  # a larger record count is not a plausible census answer
MAX_NAME = 200


def census_site(reply: Message, node: int) -> tuple[str, int]:
    """(institution name, record count) of one census reply; CensusError naming the node and field
    for anything a correct client never sends."""
    content = reply.content
    site = content.config_records.get("site")
    name = site.get("institution") if site is not None else None
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME or not name.isprintable():
        raise CensusError(f"census reply of node {node}: field site.institution must be a non-empty printable "
                          f"name of at most {MAX_NAME} characters")
    metrics = content.metric_records.get("metrics")
    count = metrics.get("num-examples") if metrics is not None else None
    if isinstance(count, float) and count.is_integer():
        count = int(count)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_RECORDS:
        shown = "missing" if count is None else f"{count!r}"[:40]
        raise CensusError(f"census reply of node {node} ({name[:60]}): field num-examples must be a whole number "
                          f"of records in 1..{MAX_RECORDS:.0e}, got {shown}")
    return name, count


def census(grid: Grid, job: JobConfig, timeout: float = 300.0, expected: FederatedData | None = None,
           config: ConfigRecord | None = None) -> tuple[FederatedData, dict[str, int]]:
    """Wait for the job's `institutions` SuperNodes, ask each for its name and record count
    (`query.census`) and return the server's data view with those institutions and counts, plus
    institution -> node id. Counts are all that is revealed (they are sent with every update).
    `expected` (simulation: the server's own split): names and counts must be exactly its own;
    `config`: the message config (default: the job's flat config and label names)."""
    data = expected or federated_data(job)
    deadline = time.time() + timeout
    # all of the job's institutions, or with `min_institutions` at least that many after the timeout
    wanted, needed = job.federation.institutions, job.federation.min_institutions or job.federation.institutions
    nodes = list(grid.get_node_ids())
    while len(nodes) < wanted and time.time() < deadline:
        time.sleep(1.0)
        nodes = list(grid.get_node_ids())
    if len(nodes) < needed:
        raise CensusError(f"{len(nodes)} of {wanted} institutions connected after {timeout:.0f}s (the job needs "
                          f"{needed}); check their SuperNodes")
    config = config or ConfigRecord({**job.to_flat(), "label-names": list(data.label_names)})
    messages = [Message(RecordDict({"config": config}), dst_node_id=node, message_type="query.census")
                for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    answered = [r for r in replies if not r.has_error()]
    origin = reply_origin(messages)
    failed = [f"node {origin(r)}: {r.error.reason}" for r in replies if r.has_error()]
    if len(answered) < needed:  # a registered node that is offline is skipped
        raise CensusError(f"census: {len(answered)} of the {wanted} institutions the job needs answered "
                          f"(at least {needed}; {len(nodes)} asked); " + ("; ".join(failed) or "no error replies"))
    if len(answered) < wanted:
        logger.warning("census: %d of %d institutions answered; the job goes on with them (--min-institutions "
                       "%d): %s", len(answered), wanted, needed, "; ".join(failed) or "others silent")
    sites = sorted((name, origin(r), count) for r in answered for name, count in [census_site(r, origin(r))])
    names = [name for name, _, _ in sites]
    if len(set(names)) != len(names):
        raise CensusError(f"two nodes claim the same institution: {names}")
    if expected is not None:
        own = {name: len(rows) for name, rows in zip(expected.institutions, expected.train)}
        for name, node, count in sites:
            if own.get(name) != count:
                raise CensusError(f"census reply of node {node}: institution {name!r} with num-examples {count} is "
                                  f"not in the server's split ({own.get(name, 'no such institution')})")
    view = replace(data, institutions=names, train=[RecordCount(n) for _, _, n in sites])
    return view, {name: node for name, node, _ in sites}


def make_server_app(job: JobConfig, reporter: Reporter | None = None, run=None) -> ServerApp:
    """A ServerApp running `run(grid, job, reporter)` (default: one federated job)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        (run or run_federation)(grid, job, reporter)

    return server
