"""Thin Flower strategy: FedAvg over adapter tensors with the pure streaming average, keeping a
per-round, per-institution log (examples, loss, cumulative epsilon, bytes uploaded). With update
compression, replies are encoded deltas against the global adapter sent this round: each is
decoded and folded into the average one at a time.

Every reply is checked before it is used (`fedseek.aggregator.robust`): a reply that is malformed,
oversize, non-finite, of the wrong shapes/dtypes, or a norm outlier is left out of the average
and logged in `round_log[round]` with a `"rejected"` reason (its metrics are kept, so the privacy
it spent is still charged); a delta above the server clip norm is scaled down and logged with
`"clipped"` (the norm it had). One bad institution never fails a round that others completed.

With a `ReplyTrust` (`fedseek.aggregator.reply_trust`; run_federation and the continual runner
always give one) a reply is trusted no further than the coordinator knows: it is attributed to the
institution bound to its node id at the census (a different claimed name is logged as
`claimed_institution` and ignored), weighted by at most the records known for that node, and its
σ/q/steps are checked against the plan (off the plan: left out, charged at the worse values). A
non-finite aggregate is never returned: the round keeps the previous adapter (`aggregate_log`)."""
from __future__ import annotations

import math
import time
from collections.abc import Iterable
import logging

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedseek.aggregator.reply_trust import ReplyTrust, charge
from fedseek.aggregator.robust import (RobustAggregate, clip_delta, delta_norm, norm_outliers, update_byte_limit,
                                      validate_update)
from fedseek.config import CompressionSettings, RobustSettings
from fedseek.wire.arrays import to_arrays, to_record
from fedseek.wire.compression import apply_delta, decode
from fedseek.wire.replies import ARRAYS, ReplyError, TrainReply, claimed_institution, reported, wire_key

logger = logging.getLogger("fedseek")


def reply_origin(sent: Iterable[Message]):
    """reply -> the node it speaks for: the SuperLink answers for an unreachable node itself (with
    its own id as the source), so a reply is matched to the message it answers."""
    recipients = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in sent if m.metadata.message_id}
    return lambda reply: recipients.get(reply.metadata.reply_to_message_id, int(reply.metadata.src_node_id))


class AdapterFedAvg(FedAvg):
    """Example-weighted FedAvg of LoRA (+ head) tensors; clients never send base weights.
    `robust` picks the rule (fedavg | trimmed-mean | median) and the server-side bounds."""

    def __init__(self, institutions: int, compression: CompressionSettings | None = None,
                 extra_records: dict[str, ArrayRecord] | None = None,
                 robust: RobustSettings | None = None, node_names: dict[int, str] | None = None,
                 min_institutions: int = 0, rejoin_wait: float = 0.0, trust: ReplyTrust | None = None):
        # rounds start once `min_institutions` (default: all) are connected, and go on with the
        # replies that arrive within the round timeout: at least `min_institutions` (default: one)
        self.min_institutions, self.rejoin_wait = min_institutions, rejoin_wait
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=min_institutions or institutions,
                         min_available_nodes=min_institutions or institutions)
        # deployment: only the nodes the census identified (and the ledger pre-flighted) train
        self.node_names = node_names
        self.trust = trust  # weight caps and privacy plans by node id (None: claims are believed, tests only)
        self.aggregate_log: dict[int, str] = {}  # round -> why its aggregate was discarded
        self.expected: set[int] = set()  # nodes sent a train message this round
        self.outgoing: list[Message] = []
        self.dropped_log: dict[int, list[dict]] = {}  # round -> institutions that did not answer
        self.round_log: dict[int, list[dict]] = {}
        self.compression = compression or CompressionSettings()
        self.robust = robust or RobustSettings()
        self.sent: dict[str, np.ndarray] = {}  # the global adapter of the current round
        self.extra_records = extra_records or {}  # e.g. `ewc`: Fisher + anchors of past periods

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.sent = to_arrays(arrays)
        self._wait_for_rejoining(grid)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.node_names is not None:
            messages = [m for m in messages if m.metadata.dst_node_id in self.node_names]
        self.expected = {int(m.metadata.dst_node_id) for m in messages}
        self.outgoing = messages  # the grid gives each its message id when it sends it
        for message in messages:
            for key, record in self.extra_records.items():
                message.content[key] = record
        return messages

    def _wait_for_rejoining(self, grid: Grid) -> None:
        """Rounds that may go on without some institutions first give offline ones `rejoin_wait`
        seconds to come back (a restarted SuperNode is accepted again only once the SuperLink has
        expired the crashed one's heartbeat, often exactly when the previous round ends)."""
        if not (self.min_institutions and self.node_names and self.rejoin_wait > 0):
            return
        deadline = time.monotonic() + self.rejoin_wait
        while not set(self.node_names) <= set(grid.get_node_ids()) and time.monotonic() < deadline:
            time.sleep(1.0)

    def _update(self, msg: Message) -> tuple[dict[str, np.ndarray] | None, str | None]:
        """(the reply's update — a delta with compression, else full tensors —, or a rejection)."""
        content = msg.content
        try:
            TrainReply.parse(content)  # records, counts and types (the privacy claims: `charge`)
        except ReplyError as err:
            return None, f"malformed reply: {err}"
        try:
            raw = to_arrays(content[ARRAYS])
        except Exception as err:  # noqa: BLE001 - anything the wire format cannot turn into arrays
            return None, f"unreadable tensors: {err}"
        wire = int(sum(a.nbytes for a in raw.values()))
        limit = update_byte_limit(self.robust, self.sent) if self.sent else self.robust.max_update_bytes
        if limit and wire > limit:
            return None, f"oversize: {wire} bytes > limit {limit}"
        if self.compression.enabled:
            try:
                raw = decode(raw, self.sent)
            except Exception as err:  # noqa: BLE001
                return None, f"undecodable compressed update: {err}"
        if self.sent:
            reason = validate_update(raw, self.sent, limit, wire_bytes=wire)
            if reason:
                return None, reason
        return raw, None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        valid, failed = self._check_and_log_replies(replies, is_train=True, validate=False)
        # an error reply may come from the SuperLink (e.g. node unavailable): name the node it was for
        origin = reply_origin(self.outgoing)
        answered = {origin(m) for m in replies}
        dropped = [{"node_id": n, "institution": self._name(n), "reason": "no reply within the round timeout"}
                   for n in sorted(self.expected - answered)]
        dropped += [{"node_id": origin(m), "institution": self._name(origin(m)), "reason": m.error.reason}
                    for m in failed]
        self.dropped_log[server_round] = dropped
        for drop in dropped:
            logger.warning("round %s: %s (node %s) dropped out: %s", server_round, drop["institution"],
                           drop["node_id"], drop["reason"])
        if valid and len(valid) < self.min_institutions:
            raise RuntimeError(f"round {server_round}: {len(valid)} institutions answered, the job needs "
                               f"{self.min_institutions}; dropped: "
                               + ("; ".join(f"{d['institution']}: {d['reason']}" for d in dropped) or "none"))
        if not valid:
            reasons = "; ".join(m.error.reason for m in failed) or "no replies"
            raise RuntimeError(f"round {server_round}: no institution returned an update ({reasons})")
        # deltas are compared against zero, full tensors against the adapter sent this round
        reference = ({k: np.zeros_like(v) for k, v in self.sent.items()} if self.compression.enabled
                     else self.sent)
        entries, accepted = [], []
        for msg in valid:
            entry = self._trusted_entry(msg, origin(msg), server_round)
            off_plan = entry.pop("off_plan", None)
            update, reason = self._update(msg)
            reason = reason or off_plan
            if reason:
                entry["rejected"] = reason
            else:
                entry["update_norm"] = delta_norm(update, reference) if reference else math.nan
                accepted.append((entry, update))
            entries.append(entry)
        outliers = norm_outliers([e["update_norm"] for e, _ in accepted], self.robust.outlier_ratio)
        aggregate, weights, used = RobustAggregate(self.robust), [], []
        median = float(np.median([e["update_norm"] for e, _ in accepted])) if accepted else math.nan
        for (entry, update), outlier in zip(accepted, outliers):
            if outlier:
                entry["rejected"] = (f"norm outlier: delta norm {entry['update_norm']:.4g} > "
                                     f"{self.robust.outlier_ratio:g} x round median {median:.4g}")
                continue
            if self.robust.clip_norm > 0 and reference:
                update, scale = clip_delta(update, reference, self.robust.clip_norm)
                if scale < 1.0:
                    entry["clipped"] = entry["update_norm"]
            aggregate.add(update, entry["num_examples"])
            weights.append(entry["num_examples"])
            used.append(entry)
        for entry in entries:
            if "rejected" in entry:
                logger.warning("round %s: update of %s (node %s) rejected: %s", server_round,
                               entry["institution"], entry["node_id"], entry["rejected"])
            elif "clipped" in entry:
                logger.info("round %s: update of %s clipped from norm %.4g to %g", server_round,
                            entry["institution"], entry["clipped"], self.robust.clip_norm)
        self.round_log[server_round] = sorted(entries, key=lambda e: e["institution"])
        if not used:
            raise RuntimeError(f"round {server_round}: no valid update; "
                               + "; ".join(f"{e['institution']}: {e['rejected']}" for e in entries))
        merged = aggregate.result()
        if self.compression.enabled:  # the average of the deltas, applied to what was sent
            merged = apply_delta(self.sent, merged)
        bad = sorted(n for n, v in merged.items() if not np.all(np.isfinite(v)))
        if bad:  # never publish it: the round keeps the adapter it started from
            self.aggregate_log[server_round] = (f"non-finite aggregate in {len(bad)} tensors ({bad[0]}, ...): "
                                                "the round keeps the previous adapter")
            logger.error("round %s: %s", server_round, self.aggregate_log[server_round])
            merged = {k: v.copy() for k, v in self.sent.items()}
        total = sum(weights)
        summary = MetricRecord({
            "train-loss": sum(e["train_loss_last"] * w for e, w in zip(used, weights)) / total,
            wire_key("bytes_up"): float(sum(e["bytes_up"] for e in entries)),
            wire_key("num_examples"): total,
        })
        return to_record(merged), summary


    def _name(self, node_id) -> str:
        return (self.node_names or {}).get(int(node_id), f"node-{node_id}")

    def _trusted_entry(self, msg: Message, node: int, server_round: int) -> dict:
        """The reply's round-log entry, attributed to the institution bound to `node`, weighted by
        at most its known records and charged no less than the plan (`off_plan`: why it is off)."""
        entry = _entry(msg)
        claimed, entry["node_id"] = entry["institution"], node
        if self.node_names is not None:
            entry["institution"] = self._name(node)
            if claimed != entry["institution"]:
                entry["claimed_institution"] = claimed
                logger.warning("round %s: node %s (%s) claims to be %r: claim ignored", server_round, node,
                               entry["institution"], claimed)
        if self.trust is None:
            return entry
        if node not in self.trust.records:
            entry["off_plan"] = f"node {node} was not bound to an institution at the census"
            return entry
        examples = entry.get("num_examples")
        if isinstance(examples, float) and math.isfinite(examples) and examples > 0:
            weight, note = self.trust.weight(node, examples)
            if note:
                entry["claimed_num_examples"], entry["num_examples"] = examples, weight
                logger.warning("round %s: %s (node %s): %s", server_round, entry["institution"], node, note)
        plan = self.trust.plans.train(node) if self.trust.plans is not None else None
        if plan is not None:
            reason = charge(entry, plan, (server_round + self.trust.round_offset) * plan.steps)
            if reason:
                entry["off_plan"] = reason
        return entry


def _entry(msg: Message) -> dict:
    """The round log entry of one reply: claimed institution, node and its metrics (as floats)."""
    claimed = claimed_institution(msg.content)
    name = str(claimed) if claimed is not None else f"node-{msg.metadata.src_node_id}"
    entry: dict = {"institution": name, "node_id": int(msg.metadata.src_node_id),
                   "train_loss_last": TrainReply.train_loss_last, "bytes_up": float(TrainReply.bytes_up)}
    entry.update(reported(msg.content))  # every number, also of a refused reply: its privacy is charged
    return entry
