"""How far the coordinator trusts an institution's reply (no Flower, MLflow, SQL or Ray imports).

Every reply may come from a malicious institution, so nothing it claims about itself is used as is:

- weight: `num-examples` is capped by the count the coordinator knows for the replying node (the
  census count in deployment, the partition size it computed itself in simulation);
- identity: the institution is the one bound to the replying node id at the census; the name the
  reply carries is only compared with it (`fedseek.aggregator.strategy`);
- privacy claims: σ, q and the cumulative steps are compared with the job's plan (σ derived exactly
  as the client derives it, `LocalTrainer.plan_noise`); a reply off the plan is left out of the
  average, and its ledger entry is charged at the worse of claim and plan (lower σ, higher q,
  more steps, smaller δ) — never less than the plan. A missing claim, or one that is no valid
  number (NaN, σ < 0, q outside (0, 1], non-integer or absurd steps), counts as the plan's value
  and puts the reply off the plan. A claimed σ = 0 is charged as such (ε = ∞).
"""
from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from fedseek.aggregator.robust import validate_fisher
from fedseek.privacy.accountant import default_delta
from fedseek.privacy.planning import job_round_release
from fedseek.wire.arrays import to_arrays
from fedseek.wire.replies import FisherReply, ReplyError, TrainReply, claimed_institution, reported, wire_key


@dataclass(frozen=True)
class Plan:
    """One institution's planned release per round (per Fisher pass): σ, q, steps and δ."""

    sigma: float
    q: float
    steps: int
    delta: float


def train_plan(job, records: int) -> Plan:
    """What a correct client uses for training (`planning.job_round_release`, as
    `LocalTrainer.plan_noise`, including the budget it reserves for a planned DP Fisher pass)."""
    sigma, q, delta = job_round_release(job, records)  # the function the client and the ledger use
    return Plan(float(sigma), q, job.optim.local_steps, delta)


def fisher_plan(job, records: int) -> Plan:
    """What a correct client uses for its one DP Fisher pass."""
    return Plan(float(job.fisher.noise_multiplier), float(job.fisher.sample_rate), 1,
                job.privacy.delta or default_delta(records))


class Plans:
    """node id -> its train Plan, computed in a background thread from the start (calibrating σ
    takes seconds per distinct δ, while the institutions train anyway)."""

    _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedseek-plan")

    def __init__(self, job, records: dict[int, int]):
        self.job, self.records = job, dict(records)
        self._futures: dict[int, Future] = {n: self._pool.submit(train_plan, job, r) for n, r in records.items()}

    def train(self, node: int) -> Plan | None:
        """The node's plan; None if it is not bound or no σ fits the job's budget (a correct
        client then refuses to train, so there is nothing to compare with)."""
        future = self._futures.get(int(node))
        try:
            return future.result() if future is not None else None
        except ValueError:
            return None

    def fisher(self, node: int) -> Plan | None:
        return fisher_plan(self.job, self.records[int(node)]) if int(node) in self.records else None


@dataclass
class ReplyTrust:
    """What the coordinator knows of each bound node: the records it may be weighted by, the
    privacy plan its claims are checked against (None without DP) and the rounds done before
    this run (a resumed job: the clients count steps over the whole job)."""

    records: dict[int, int]
    plans: Plans | None = None
    round_offset: int = 0

    def weight(self, node: int, claimed: float) -> tuple[float, str | None]:
        """(the aggregation weight, a note if the claim was cut down to the known count)."""
        known = self.records.get(int(node))
        if known is None:
            return 0.0, f"node {node} is not bound to an institution: weight 0"
        if claimed > known:
            return float(known), f"num-examples {claimed:.6g} capped at the {known} records known for the node"
        return float(claimed), None


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def charge(entry: dict, plan: Plan, steps_so_far: int, reply: type = TrainReply) -> str | None:
    """Set `entry`'s σ/q/steps/δ (`reply.CLAIMS`: the fields the ledger charges) to the worse of
    claim and plan (a missing or invalid claim counts as the plan's value), keeping differing claims
    as `claimed_<field>`; return why the reply is off the plan, or None. `steps_so_far`: the
    cumulative steps a correct reply reports (`plan.steps` for a Fisher pass)."""
    sigma_key, q_key, steps_key, delta_key = reply.CLAIMS
    planned = {sigma_key: plan.sigma, q_key: plan.q, steps_key: steps_so_far, delta_key: plan.delta}
    worse = {sigma_key: min, q_key: max, steps_key: max, delta_key: min}  # each: the larger epsilon
    problems = []
    for key, want in planned.items():
        raw, name = entry.get(key), wire_key(key.removeprefix("fisher_"))
        claim = _number(raw)
        if not reply.claim_ok(key, claim):
            problems.append(f"{name} {raw!r} is no valid claim")
            value = want
        else:
            value = worse[key](claim, want)
            # sigma and q must match exactly (both sides derive them the same way); delta is
            # only an accounting parameter: a smaller one is charged, not refused
            if key != delta_key and not math.isclose(claim, want, rel_tol=1e-9, abs_tol=0.0):
                problems.append(f"{name} {claim:.6g}, planned {want:.6g}")
        if raw is None or _number(raw) != value:
            entry[f"claimed_{key}"] = raw
        entry[key] = int(value) if key == steps_key else float(value)
    if not problems:
        return None
    return ("off the privacy plan (" + "; ".join(problems) + f"): charged at sigma {entry[sigma_key]:.6g}, "
            f"q {entry[q_key]:.6g}, steps {entry[steps_key]}")


def fisher_reply(reply, node: int, nodes: dict[int, str], trust: ReplyTrust, reference: dict,
                 limit: int) -> tuple[dict, dict | None]:
    """(the Fisher log entry of one reply, its tensors or None if it is left out): attributed to the
    node's bound institution, weight capped, privacy claims charged no less than the plan, tensors
    checked like a train reply's and non-negative. `reply`: a Flower Message (read, not imported)."""
    entry: dict = {"institution": nodes.get(node, f"node-{node}"), "node_id": node, "kind": "fisher"}
    if reply.has_error():
        entry["rejected"] = f"error reply: {reply.error.reason}"
        return entry, None
    content = reply.content
    entry.update(reported(content))  # every claim is logged (and charged), even in a refused reply
    claimed = claimed_institution(content)
    if claimed != entry["institution"]:
        entry["claimed_institution"] = claimed
    plan = trust.plans.fisher(node) if trust.plans is not None else None
    reasons = [charge(entry, plan, plan.steps, FisherReply) if plan else None]
    fisher = None
    try:
        parsed = FisherReply.parse(content)
    except ReplyError as err:
        reasons.append(f"malformed reply: {err}")
    else:
        examples = float(parsed.num_examples)
        weight, note = trust.weight(node, examples)
        if note:
            entry["claimed_num_examples"], entry["num_examples"] = examples, weight
        if weight <= 0:
            reasons.append(note)
        try:
            fisher = to_arrays(content["arrays"])
            reasons.append(validate_fisher(fisher, reference, limit))
        except Exception as err:  # noqa: BLE001 - anything the wire format cannot turn into arrays
            reasons.append(f"unreadable tensors: {err}")
    reasons = [r for r in reasons if r]
    if reasons:
        entry["rejected"] = "; ".join(reasons)
        return entry, None
    return entry, fisher
