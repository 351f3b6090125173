"""Replies trusted no further than the coordinator knows (issue 15, parts 5-7 and 9), each test playing
a malicious institution with real Flower messages against the real strategy, Fisher aggregation,
census and (for attribution and charges) the real SQLite ledger:

- a huge `num-examples` claim (1e12, 1e300) changes nothing: the weight is capped by the records the
  coordinator knows for the node; a non-finite aggregate is never published;
- a reply claiming another institution's name is attributed to the node's bound institution;
- σ/q/steps off the plan: the update is left out and the ledger charges the worse of claim and plan;
- NaN, negative or missing-tensor Fisher replies (and error replies) are left out, never fatal;
- census replies with bad counts or names are refused with a CensusError naming node and field."""
from __future__ import annotations

import time
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict

from fedseek.aggregator.continual_app import ContinualRunner
from fedseek.aggregator.period import round_row
from fedseek.aggregator.reply_trust import Plans, ReplyTrust, train_plan
from fedseek.aggregator.server_app import CensusError, census
from fedseek.aggregator.strategy import AdapterFedAvg
from fedseek.config import JobConfig, RobustSettings
from fedseek.data.tasks import FederatedData
from fedseek.wire.arrays import to_arrays

RNG = np.random.default_rng(0)
GLOBAL = {"layer.lora_A.weight": RNG.normal(size=(4, 16)).astype(np.float32),
          "layer.lora_B.weight": np.zeros((16, 4), np.float32),
          "score.modules_to_save.weight": RNG.normal(size=(5, 16)).astype(np.float32)}
COMMON = {k: 0.02 * RNG.normal(size=v.shape).astype(np.float32) for k, v in GLOBAL.items()}
NAMES = {11: "bank_a", 12: "bank_b", 13: "bank_c", 14: "bank_d", 15: "bank_e"}
RECORDS = {11: 100, 12: 120, 13: 80, 14: 100, 15: 90}
SIGMA, Q, STEPS, DELTA = 1.0, 0.125, 2, 1e-5


def job() -> JobConfig:
    """A DP job whose σ is given (no calibration in tests): 3 rounds of 2 local steps."""
    j = JobConfig()
    j.federation.rounds, j.optim.local_steps, j.optim.batch_fraction = 3, STEPS, Q
    j.privacy.noise_multiplier, j.privacy.delta, j.federation.out = SIGMA, DELTA, "unused"
    return j


def instruction(node: int, kind: str = "train") -> Message:
    metadata = Metadata(run_id=1, message_id=f"m{node}", src_node_id=0, dst_node_id=node, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=3600, message_type=kind)
    return Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), metadata=metadata)


def claims(server_round: int = 1, **override) -> dict:
    """The privacy metrics a correct client sends in round `server_round`."""
    metrics = {"noise-multiplier": SIGMA, "sample-rate": Q, "steps": server_round * STEPS, "delta": DELTA}
    metrics.update({k.replace("_", "-"): v for k, v in override.items()})
    return {k: v for k, v in metrics.items() if v is not None}


def reply(node: int, tensors: dict, examples: float | None = None, name: str | None = None, to: Message | None = None,
          **override) -> Message:
    metrics = MetricRecord({"num-examples": RECORDS[node] if examples is None else examples, "train-loss-last": 1.0,
                            "bytes-up": 10, **claims(**override)})
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in tensors.items()}),
                               "metrics": metrics, "site": ConfigRecord({"institution": name or NAMES[node]})}),
                   reply_to=to or instruction(node))


def honest(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {k: v + COMMON[k] + 0.005 * rng.normal(size=v.shape).astype(np.float32) for k, v in GLOBAL.items()}


def flipped(seed: int, factor: float = -1.0) -> dict:
    """global + factor x an honest delta (sign-flipped, same norm at factor -1)."""
    return {k: GLOBAL[k] + factor * (v - GLOBAL[k]) for k, v in honest(seed).items()}


def trusted(robust: RobustSettings | None = None, plans: bool = False) -> AdapterFedAvg:
    """The strategy as run_federation builds it: nodes bound, weights capped, plans to check."""
    trust = ReplyTrust(dict(RECORDS), Plans(job(), RECORDS) if plans else None)
    s = AdapterFedAvg(5, robust=robust, node_names=dict(NAMES), trust=trust)
    s.sent = {k: v.copy() for k, v in GLOBAL.items()}
    return s


def merged(s: AdapterFedAvg, replies: list[Message]) -> dict[str, np.ndarray]:
    arrays, _ = s.aggregate_train(1, replies)
    return to_arrays(arrays)


def by_name(s: AdapterFedAvg, server_round: int = 1) -> dict[str, dict]:
    return {e["institution"]: e for e in s.round_log[server_round]}


# -- part 5: one institution cannot take over the average -------------------------------------------
@pytest.mark.parametrize("claim,factor,robust", [
    (1e12, -1.0, RobustSettings()), (1e12, -1.0, RobustSettings(outlier_ratio=3.0)), (1e300, -1e11, RobustSettings())])
def test_a_huge_num_examples_claim_changes_nothing(claim, factor, robust):
    updates = {node: honest(node) for node in (11, 12, 13, 14)} | {15: flipped(15, factor)}
    fair = [reply(n, u) for n, u in updates.items()]
    attack = fair[:4] + [reply(15, updates[15], examples=claim)]
    expected = merged(trusted(robust), fair)
    s = trusted(robust)
    got = merged(s, attack)
    weights = np.array([RECORDS[n] for n in updates], dtype=np.float64)
    for name in GLOBAL:
        assert np.all(np.isfinite(got[name]))
        np.testing.assert_array_equal(got[name], expected[name])  # the claim changed nothing
        average = sum(w * updates[n][name].astype(np.float64) for n, w in zip(updates, weights)) / weights.sum()
        np.testing.assert_allclose(got[name], average.astype(np.float32), rtol=1e-5, atol=1e-6)
    entry = by_name(s)["bank_e"]
    assert entry["num_examples"] == 90 and entry["claimed_num_examples"] == claim and "rejected" not in entry


def test_a_non_finite_aggregate_is_never_published_the_round_keeps_the_previous_adapter():
    """Without weight caps (a strategy built with no ReplyTrust), 1e300 x large finite values
    overflow the float64 sums: the round keeps the adapter it started from, logged."""
    s = AdapterFedAvg(5)
    s.sent = {k: v.copy() for k, v in GLOBAL.items()}
    arrays, _ = s.aggregate_train(3, [reply(11, honest(11)), reply(15, flipped(15, -1e30), examples=1e300)])
    for name, value in GLOBAL.items():
        np.testing.assert_array_equal(to_arrays(arrays)[name], value)
    assert "non-finite aggregate" in s.aggregate_log[3] and "keeps the previous adapter" in s.aggregate_log[3]


# -- part 6: attribution by node id, claims checked against the plan ----------------------------------
def test_a_spoofed_institution_name_changes_no_attribution_in_round_log_or_ledger(tmp_path):
    """bank_c's node (13) replies as bank_a and claims sigma 50 over 1 step at q 0.01: its entry
    stays bank_c's, is left out of the average, and the SQLite ledger charges bank_c at the plan."""
    from sqlalchemy import select

    from fedseek.data.tasks import load_federated_data
    from fedseek.platform.store.db import LedgerEntry, session_scope
    from fedseek.platform.run.reporter import PlatformReporter
    from fedseek.platform.store.settings import PlatformSettings

    data = load_federated_data("banking77", institutions=3, max_train_rows=240)
    nodes = {11: "bank_a", 12: "bank_b", 13: "bank_c"}
    records = {n: len(data.train[data.institutions.index(name)]) for n, name in nodes.items()}
    s = AdapterFedAvg(3, node_names=nodes, trust=ReplyTrust(records, Plans(job(), records)))
    s.sent = {k: v.copy() for k, v in GLOBAL.items()}
    s.aggregate_train(1, [reply(11, honest(11), examples=records[11]), reply(12, honest(12), examples=records[12]),
                          reply(13, honest(13), examples=records[13], name="bank_a", noise_multiplier=50.0,
                                steps=1, sample_rate=0.01)])
    log = by_name(s)
    assert sorted(log) == ["bank_a", "bank_b", "bank_c"] and log["bank_a"]["node_id"] == 11
    spoof = log["bank_c"]
    assert spoof["node_id"] == 13 and spoof["claimed_institution"] == "bank_a"
    assert "off the privacy plan" in spoof["rejected"]
    assert (spoof["noise_multiplier"], spoof["sample_rate"], spoof["steps"]) == (SIGMA, Q, STEPS)
    assert "rejected" not in log["bank_a"]

    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    reporter = PlatformReporter(settings=PlatformSettings(home=tmp_path / "home", db_url=db,
                                                          mlflow_uri="http://127.0.0.1:9"))
    reporter.preflight(job(), data)
    reporter.start(job(), data, {"accuracy": 0.0, "loss": 4.0})
    reporter.round(round_row(1, {"accuracy": 0.1, "loss": 4.0}, s.round_log[1], time.time()))
    with session_scope(db) as session:
        charged = sorted((e.institution.name, e.sigma, e.q, e.steps) for e in session.scalars(select(LedgerEntry)))
    assert charged == [(n, SIGMA, Q, STEPS) for n in ("bank_a", "bank_b", "bank_c")]


@pytest.mark.parametrize("override,charged", [
    ({"noise_multiplier": 50.0}, (SIGMA, Q, STEPS)),  # claims more noise: charged at the plan
    ({"noise_multiplier": 0.5}, (0.5, Q, STEPS)),  # less noise: charged at its claim
    ({"sample_rate": 0.01}, (SIGMA, Q, STEPS)),
    ({"sample_rate": 0.5}, (SIGMA, 0.5, STEPS)),
    ({"steps": 1}, (SIGMA, Q, STEPS)),
    ({"steps": 7}, (SIGMA, Q, 7)),
    ({"noise_multiplier": None, "steps": None}, (SIGMA, Q, STEPS)),  # missing claims: the plan
    ({"noise_multiplier": float("nan"), "sample_rate": -1.0}, (SIGMA, Q, STEPS)),
])
def test_privacy_claims_off_the_plan_are_left_out_and_never_undercharged(override, charged):
    s = trusted(plans=True)
    replies = [reply(n, honest(n)) for n in (11, 12, 13, 14)] + [reply(15, honest(15), **override)]
    merged(s, replies)
    log = by_name(s)
    entry = log["bank_e"]
    assert "off the privacy plan" in entry["rejected"], entry
    assert (entry["noise_multiplier"], entry["sample_rate"], entry["steps"]) == charged
    assert all("rejected" not in log[n] and log[n]["noise_multiplier"] == SIGMA for n in ("bank_a", "bank_d"))


def test_a_resumed_job_plans_its_cumulative_steps_from_the_round_offset():
    s = trusted(plans=True)
    s.trust.round_offset = 2  # Flower's round 1 is the job's round 3: a correct client reports 6 steps
    merged(s, [reply(n, honest(n), steps=3 * STEPS) for n in (11, 12)] + [reply(13, honest(13), steps=STEPS)])
    log = by_name(s)
    assert "rejected" not in log["bank_a"] and log["bank_c"]["steps"] == 3 * STEPS
    assert "steps 2, planned 6" in log["bank_c"]["rejected"]


def test_the_plan_is_the_clients_sigma_derivation():
    """σ derived from the target ε exactly as LocalTrainer.plan_noise does (bit-identical)."""
    from fedseek.clients.dp_trainer import LocalTrainer

    j = job()
    j.privacy.noise_multiplier, j.privacy.target_epsilon, j.federation.rounds = None, 8.0, 5
    client = LocalTrainer.plan_noise(None, j.privacy, j.optim, 500, j.federation.rounds, [])
    plan = train_plan(j, 500)
    assert (plan.sigma, plan.q, plan.delta) == client and plan.steps == STEPS


# -- part 7: Fisher replies ------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """The run id the ServerApp process has (messages the server builds carry it)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)  # the SuperLink-side id of the ServerApp
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class FakeGrid:
    """Answers each message with `answer(node, message)` as the SuperLink would deliver it."""

    def __init__(self, answer, nodes):
        self.answer, self.nodes = answer, list(nodes)

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as the grid does on push
        return [self.answer(int(m.metadata.dst_node_id), m) for m in messages]


def fisher_reply(node: int, to: Message, tensors: dict | None = None, examples: float | None = None,
                 name: str | None = None) -> Message:
    tensors = tensors if tensors is not None else {k: np.full_like(v, 0.01 * (node - 10)) for k, v in GLOBAL.items()}
    metrics = MetricRecord({"num-examples": RECORDS[node] if examples is None else examples, "bytes-up": 10,
                            "fisher-noise-multiplier": 10.0, "fisher-sample-rate": 0.5, "fisher-steps": 1,
                            "delta": DELTA, "epsilon": 1.0})
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in tensors.items()}), "metrics": metrics,
                               "site": ConfigRecord({"institution": name or NAMES[node]})}), reply_to=to)


def test_bad_fisher_replies_are_left_out_with_a_reason_and_never_crash_the_job():
    def answer(node, message):
        good = {k: np.full_like(v, 0.01 * (node - 10)) for k, v in GLOBAL.items()}
        if node == 13:  # NaN
            return fisher_reply(node, message, {**good, "layer.lora_B.weight": np.full((16, 4), np.nan, np.float32)})
        if node == 14:  # negative: would push parameters away from their anchor
            return fisher_reply(node, message, {**good, "layer.lora_A.weight": -np.ones((4, 16), np.float32)})
        if node == 15:  # a tensor missing
            return fisher_reply(node, message, {k: v for k, v in good.items() if "lora_A" not in k})
        if node == 16:  # the node failed
            return Message(Error(code=0, reason="ClientApp raised"), reply_to=message)
        if node == 12:  # claims bank_a's name and 1e12 examples
            return fisher_reply(node, message, examples=1e12, name="bank_a")
        return fisher_reply(node, message)

    nodes = {**NAMES, 16: "bank_f"}
    records = {**RECORDS, 16: 50}
    runner = SimpleNamespace(grid=FakeGrid(answer, nodes), nodes=nodes)
    trust = ReplyTrust(records, Plans(job(), records))
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    fisher, log = ContinualRunner.federated_fisher(runner, arrays, ConfigRecord({}), trust, job())
    log = {e["institution"]: e for e in log}
    assert "non-finite values" in log["bank_c"]["rejected"]
    assert "negative values" in log["bank_d"]["rejected"]
    assert "missing ['layer.lora_A.weight']" in log["bank_e"]["rejected"]
    assert "error reply: ClientApp raised" in log["bank_f"]["rejected"]
    assert log["bank_b"]["claimed_institution"] == "bank_a" and log["bank_b"]["num_examples"] == 120
    assert all(log[n]["fisher_steps"] == 1 for n in ("bank_a", "bank_c", "bank_d"))  # charged all the same
    expected = (100 * 0.01 + 120 * 0.02) / 220  # bank_a and bank_b (capped), nothing else
    for name, value in fisher.items():
        np.testing.assert_allclose(value.numpy(), np.full(GLOBAL[name].shape, expected), rtol=1e-5)


def test_fisher_claims_off_the_plan_are_charged_no_less_than_the_plan():
    def answer(node, message):
        sent = fisher_reply(node, message)
        if node == 12:
            sent.content["metrics"]["fisher-noise-multiplier"] = 1e6
        return sent

    nodes = {11: "bank_a", 12: "bank_b"}
    runner = SimpleNamespace(grid=FakeGrid(answer, nodes), nodes=nodes)
    trust = ReplyTrust({11: 100, 12: 120}, Plans(job(), {11: 100, 12: 120}))
    _, log = ContinualRunner.federated_fisher(runner, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}),
                                              ConfigRecord({}), trust, job())
    entry = {e["institution"]: e for e in log}["bank_b"]
    assert "off the privacy plan" in entry["rejected"] and entry["fisher_noise_multiplier"] == 10.0


# -- part 9: census replies ----------------------------------------------------------------------------
def census_reply(message: Message, count=100, name="bank_x") -> Message:
    metrics = MetricRecord({} if count is None else {"num-examples": count})
    site = ConfigRecord({} if name is None else {"institution": name})
    return Message(RecordDict({"metrics": metrics, "site": site}), reply_to=message)


@pytest.mark.parametrize("count,name,field", [
    (-5, "bank_x", "num-examples"), (None, "bank_x", "num-examples"), (2.5, "bank_x", "num-examples"),
    (10**12, "bank_x", "num-examples"), (0, "bank_x", "num-examples"), (100, None, "site.institution"),
    (100, "", "site.institution"), (100, "a\nb", "site.institution")])
def test_a_census_reply_with_a_bad_count_or_name_is_refused_naming_node_and_field(count, name, field):
    answers = {21: (100, "bank_21"), 22: (count, name)}
    grid = FakeGrid(lambda node, m: census_reply(m, *answers[node]), [21, 22])
    j = job()
    j.federation.institutions = 2
    data = FederatedData("t", ["a", "b"], ["bank_21", "bank_22"], [[0] * 100] * 2, None)
    with pytest.raises(CensusError, match=rf"node 22.*field {field}"):
        census(grid, j, timeout=1, expected=data)


def test_a_simulation_census_binds_node_ids_and_refuses_counts_off_the_split():
    j = job()
    j.federation.institutions = 2
    data = FederatedData("t", ["a", "b"], ["bank_a", "bank_b"], [[0] * 100, [0] * 80], None)
    names = {21: "bank_a", 22: "bank_b"}
    ok = FakeGrid(lambda node, m: census_reply(m, 100 if node == 21 else 80, names[node]), names)
    assert census(ok, j, timeout=1, expected=data)[1] == {"bank_a": 21, "bank_b": 22}
    inflated = FakeGrid(lambda node, m: census_reply(m, 100 if node == 21 else 8000, names[node]), names)
    with pytest.raises(CensusError, match="node 22: institution 'bank_b' with num-examples 8000 is not in the"):
        census(inflated, j, timeout=1, expected=data)
