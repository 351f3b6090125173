"""Flower ServerApp: FedAvg over LoRA adapters with centralized evaluation on the global test set
each round (`period.run_period`, which also saves the final adapter and writes report.json), and
the census that binds node ids to institutions.

`make_server_app(job, reporter)` is what `fedseek simulate` runs; the `flwr run` entry, which
reads the job from the run config, is `fedseek.platform.flower_app:app` (the platform composes,
the aggregator never imports it).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedseek.aggregator.period import Period, reply_trust, run_period
from fedseek.aggregator.rounds import Reporter, SilentReporter
from fedseek.aggregator.strategy import reply_origin
from fedseek.config import JobConfig
from fedseek.data.plan import federated_data, job_data
from fedseek.data.tasks import FederatedData
from fedseek.models.adapted import adapted_model, encode_rows
from fedseek.models.lora import load_trainable_state, trainable_state
from fedseek.wire.arrays import to_record
from fedseek.wire.replies import CensusReply, ReplyError


logger = logging.getLogger("fedseek")


def run_federation(grid: Grid, job: JobConfig, reporter: Reporter | None = None,
                   sites: FederatedData | None = None, nodes: dict[int, str] | None = None,
                   resume=None) -> dict:
    """Run the whole job on `grid` and return the report (also written to `out/report.json`): the
    one-period case of `period.run_period`, with no hooks.
    `sites`: the institutions as a census found them (deployment), reported instead of the
    server's own view of the data; `nodes`: node id -> institution, the only nodes that train
    (without them, i.e. in simulation, a census binds each node id to its institution first);
    `resume`: a `fedseek.platform.store.resume.ResumePoint` (rounds 1..k committed): go on from round k+1."""
    started = time.time()
    data = job_data(job)  # (simulation: also each institution's own file, see `job_data`)
    classifier = adapted_model(job, len(data.label_names))
    test = encode_rows(classifier, data.test)
    initial = classifier.evaluate(test)
    done = resume.committed if resume else 0  # Flower numbers this run's rounds 1..; the job's are done+1..
    if resume and resume.tensors is not None:
        load_trainable_state(classifier.model, {k: torch.from_numpy(np.array(v)) for k, v in resume.tensors.items()})
    if nodes is None:  # simulation: bind node ids to institutions, counts checked against the split
        nodes = {node: name for name, node in census(grid, job, expected=data)[1].items()}
    train_config = ConfigRecord({**job.to_flat(), "label-names": list(data.label_names), "round-offset": done})
    period = Period(job, sites or data, classifier, test, to_record(trainable_state(classifier.model)), initial,
                    nodes, reply_trust(job, sites or data, nodes, done), train_config, started, done,
                    list(resume.rows) if resume else [], resumed=resume is not None)
    return run_period(grid, period, reporter or SilentReporter())[1]


@dataclass
class RecordCount:
    """An institution's training-record count as its census reply gave it (no records)."""

    records: int

    def __len__(self) -> int:
        return self.records


class CensusError(RuntimeError):
    """Not enough institutions connected, or one refused the census, or a census reply is unusable.
    `online`: the node ids that were connected when too few were."""

    def __init__(self, message: str, online: tuple[int, ...] | None = None):
        super().__init__(message)
        self.online = online


def census_site(reply: Message, node: int) -> tuple[str, int]:
    """(institution name, record count) of one census reply; CensusError naming the node and field
    for anything a correct client never sends."""
    try:
        site = CensusReply.from_message(reply)
    except ReplyError as err:
        raise CensusError(f"census reply of node {node}: field {err}") from None
    return site.institution, site.num_examples


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
                          f"{needed}); check their SuperNodes", online=tuple(nodes))
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
