"""Thin Flower strategy: FedAvg over adapter tensors with the pure streaming average, keeping a
per-round, per-institution log (examples, loss, cumulative epsilon, bytes uploaded). With update
compression, replies are encoded deltas against the global adapter sent this round: each is
decoded and folded into the average one at a time."""
from __future__ import annotations

from collections.abc import Iterable
import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedseek.aggregator.aggregation import StreamingAverage
from fedseek.aggregator.compression import CompressionSettings, apply_delta, decode

logger = logging.getLogger("fedseek")


class AdapterFedAvg(FedAvg):
    """Example-weighted FedAvg of LoRA (+ head) tensors; clients never send base weights."""

    def __init__(self, institutions: int, compression: CompressionSettings | None = None,
                 extra_records: dict[str, ArrayRecord] | None = None):
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=institutions,
                         min_available_nodes=institutions)
        self.round_log: dict[int, list[dict]] = {}
        self.compression = compression or CompressionSettings()
        self.sent: dict[str, np.ndarray] = {}  # the global adapter of the current round
        self.extra_records = extra_records or {}  # e.g. `ewc`: Fisher + anchors of past periods

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.compression.enabled:
            self.sent = {k: v.numpy() for k, v in arrays.items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for message in messages:
            for key, record in self.extra_records.items():
                message.content[key] = record
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, failed = self._check_and_log_replies(replies, is_train=True)
        for msg in failed:
            logger.warning("round %s: node %s failed: %s", server_round, msg.metadata.src_node_id,
                           msg.error.reason)
        if not valid:
            reasons = "; ".join(m.error.reason for m in failed) or "no replies"
            raise RuntimeError(f"round {server_round}: no institution returned an update ({reasons})")
        average, weights, entries = StreamingAverage(), [], []
        for msg in valid:
            metrics = msg.content["metrics"]
            update = {k: v.numpy() for k, v in msg.content["arrays"].items()}
            average.add(decode(update, self.sent) if self.compression.enabled else update,
                        float(metrics["num-examples"]))
            weights.append(float(metrics["num-examples"]))
            entry = {"institution": str(msg.content["site"]["institution"]),
                     "node_id": int(msg.metadata.src_node_id)}
            entry.update({k.replace("-", "_"): float(v) for k, v in metrics.items()})
            entries.append(entry)
        merged = average.result()
        if self.compression.enabled:  # the average of the deltas, applied to what was sent
            merged = apply_delta(self.sent, merged)
        self.round_log[server_round] = sorted(entries, key=lambda e: e["institution"])
        total = sum(weights)
        summary = MetricRecord({
            "train-loss": sum(e["train_loss_last"] * w for e, w in zip(entries, weights)) / total,
            "bytes-up": float(sum(e["bytes_up"] for e in entries)),
            "num-examples": total,
        })
        return ArrayRecord({k: Array(v) for k, v in merged.items()}), summary
