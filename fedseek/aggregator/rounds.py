"""The federation's round loop and the reporter it answers to.

`run_rounds` is Flower's `Strategy.start` loop (configure_train -> send_and_receive ->
aggregate_train -> centralized evaluation), less the federated evaluation FedSeek never uses
(`fraction_evaluate=0`), with one addition: before every next round the reporter is asked
`should_continue()` (the platform answers no when the next round would exceed an institution's
privacy budget). The job then ends cleanly after its last committed round; nothing is raised
through Flower.
"""
from __future__ import annotations

from logging import INFO
from typing import Callable, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy


class Reporter(Protocol):
    """What a federated job tells its caller (console, platform DB / ledger / MLflow)."""

    stop_reason: str  # why should_continue() said no ("" while it says yes)

    def start(self, job, data, initial: dict) -> None: ...
    def checkpoint(self, round_number: int, tensors: dict[str, np.ndarray]) -> None: ...
    def round(self, row: dict) -> None: ...
    def should_continue(self) -> bool: ...
    def charge_counts(self, job, entries: list[dict]) -> None: ...
    def finish(self, report: dict) -> None: ...


class SilentReporter:
    """Reports nothing, keeps no checkpoint and never stops a job: the base of simple reporters."""

    stop_reason = ""

    def start(self, job, data, initial: dict) -> None:
        pass

    def checkpoint(self, round_number: int, tensors: dict[str, np.ndarray]) -> None:
        """The global adapter after `round_number`, before the round is committed (`round`)."""

    def round(self, row: dict) -> None:
        pass

    def should_continue(self) -> bool:
        """Asked after each committed round but the last: may the next round start?"""
        return True

    def charge_counts(self, job, entries: list[dict]) -> None:
        """Noised validation counts released by institutions (continual λ selection): a tracked
        job charges them to the privacy ledger; an untracked one has no ledger."""

    def finish(self, report: dict) -> None:
        pass


def run_rounds(strategy: Strategy, grid: Grid, arrays: ArrayRecord, num_rounds: int, train_config: ConfigRecord,
               evaluate: Callable[[int, ArrayRecord], MetricRecord | None], reporter: Reporter,
               timeout: float = 3600.0) -> tuple[ArrayRecord, str | None]:
    """Rounds 1..num_rounds of `strategy` from `arrays` (evaluated as round 0 first), each one
    evaluated (and so committed) by `evaluate`. Returns the last global arrays and, if the reporter
    ended the job early, its stop reason."""
    evaluate(0, arrays)
    for server_round in range(1, num_rounds + 1):
        log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
        replies = grid.send_and_receive(strategy.configure_train(server_round, arrays, train_config, grid),
                                        timeout=timeout)
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        arrays = aggregated if aggregated is not None else arrays
        evaluate(server_round, arrays)
        if server_round < num_rounds and not reporter.should_continue():
            return arrays, reporter.stop_reason or f"stopped by the reporter after round {server_round}"
    return arrays, None
