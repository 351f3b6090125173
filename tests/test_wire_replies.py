"""The reply schema (`fedseek.wire.replies`), both sides: what a site builds with `to_records()` reads
back identically after Flower's own protobuf serialization, and each reply a correct client never
sends (a key missing, NaN, the wrong type, a negative or fractional count, a record missing) is
refused with the key named — by the schema itself, and through the real strategy and Fisher
aggregation, where the refused reply is left out (its privacy claims still logged) and the round
completes."""
from __future__ import annotations

import ast
import math
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto

from fedseek.aggregator.reply_trust import ReplyTrust, fisher_reply
from fedseek.aggregator.strategy import AdapterFedAvg
from fedseek.wire import replies
from fedseek.wire.arrays import to_arrays
from fedseek.wire.replies import CensusReply, FisherReply, ReplyError, TrainReply, ValidationReply

GLOBAL = {"layer.lora_A.weight": np.linspace(-1, 1, 64, dtype=np.float32).reshape(4, 16),
          "score.modules_to_save.weight": np.linspace(0, 1, 80, dtype=np.float32).reshape(5, 16)}
ARRAYS = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
TRAIN = TrainReply(num_examples=120, institution="bank_a", noise_multiplier=1.1, sample_rate=0.125, steps=6,
                   delta=1e-5, bytes_up=576, epsilon=2.5, epsilon_rdp=3.1)  # under DP: losses not released
FISHER = FisherReply(num_examples=120, institution="bank_a", bytes_up=576, fisher_noise_multiplier=10.0,
                     fisher_sample_rate=0.5, fisher_steps=1, delta=1e-5, epsilon=2.7, epsilon_rdp=3.3)
NOISED = ValidationReply(correct=17.25, total=30, institution="bank_a", noise_multiplier=4.0, sample_rate=1.0,
                         steps=1, delta=1e-5)
EXACT = ValidationReply(correct=17.0, total=30, institution="bank_a")
CENSUS = CensusReply(num_examples=120, institution="bank_a")


def over_the_wire(content: RecordDict) -> RecordDict:
    """`content` as the coordinator receives it: a reply message serialized to protobuf and back."""
    metadata = Metadata(run_id=1, message_id="r1", src_node_id=11, dst_node_id=0, reply_to_message_id="m1",
                        group_id="1", created_at=time.time(), ttl=3600, message_type="train")
    return message_from_proto(message_to_proto(Message(content, metadata=metadata))).content


def same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("sent", [TRAIN, TrainReply(num_examples=40, institution="bank_b", noise_multiplier=0.0,
                                                    sample_rate=0.1, steps=4, delta=1e-5, bytes_up=8,
                                                    train_loss_first=2.3, train_loss_last=1.9),
                                  FISHER, FisherReply(num_examples=40, institution="b", bytes_up=8),
                                  NOISED, EXACT, CENSUS])
def test_to_records_then_parse_gives_the_same_reply(sent):
    needs_arrays = isinstance(sent, (TrainReply, FisherReply))
    received = over_the_wire(sent.to_records(ARRAYS if needs_arrays else None))
    got = type(sent).parse(received)
    for name, value in vars(sent).items():
        assert same(getattr(got, name), value), (name, getattr(got, name), value)
    assert set(received.array_records) == ({"arrays"} if needs_arrays else set())
    assert dict(received["site"]) == {"institution": "bank_a" if sent.institution == "bank_a" else sent.institution}
    # fields left None are not sent: a non-DP Fisher pass carries no release, exact counts none
    assert all(replies.field_name(k) in vars(sent) and vars(sent)[replies.field_name(k)] is not None
               for k in received["metrics"])


def test_the_train_reply_keeps_the_keys_the_ledger_and_the_audit_know():
    assert set(TRAIN.to_records(ARRAYS)["metrics"]) == {
        "num-examples", "train-loss-first", "train-loss-last", "delta", "noise-multiplier", "sample-rate", "steps",
        "bytes-up", "epsilon", "epsilon-rdp"}
    assert set(FISHER.to_records(ARRAYS)["metrics"]) == {
        "num-examples", "bytes-up", "fisher-noise-multiplier", "fisher-sample-rate", "fisher-steps", "delta",
        "epsilon", "epsilon-rdp"}


def tampered(sent, arrays: bool = True, site: dict | None = None, **metrics) -> RecordDict:
    """`sent`'s records with metrics set (None: removed), the site record replaced, or no arrays."""
    content = sent.to_records(ARRAYS if arrays else None)
    values = {**dict(content["metrics"]), **{k.replace("_", "-"): v for k, v in metrics.items()}}
    records = {**({"arrays": ARRAYS} if arrays else {}),
               "metrics": MetricRecord({k: v for k, v in values.items() if v is not None}),
               "site": ConfigRecord(dict(content["site"]) if site is None else site)}
    return over_the_wire(RecordDict(records))


MALICIOUS = [  # (reply class, received content, the key the refusal names, words of the reason)
    (TrainReply, tampered(TRAIN, num_examples=None), "num-examples", "positive finite count, got missing"),
    (TrainReply, tampered(TRAIN, num_examples=math.nan), "num-examples", "got nan"),
    (TrainReply, tampered(TRAIN, num_examples=math.inf), "num-examples", "got inf"),
    (TrainReply, tampered(TRAIN, num_examples=-5), "num-examples", "got -5"),
    (TrainReply, tampered(TRAIN, num_examples=[120, 120]), "num-examples", "got [120, 120]"),
    (TrainReply, tampered(TRAIN, bytes_up=-1), "bytes-up", "count >= 0, got -1"),
    (TrainReply, tampered(TRAIN, bytes_up=math.nan), "bytes-up", "got nan"),
    (TrainReply, tampered(TRAIN, bytes_up=10.5), "bytes-up", "whole"),
    (TrainReply, tampered(TRAIN, epsilon=[1.0, 2.0]), "epsilon", "must be a number"),
    (TrainReply, tampered(TRAIN, arrays=False), "arrays", "ArrayRecord, got missing"),
    (TrainReply, RecordDict({"arrays": ARRAYS}), "metrics", "MetricRecord, got missing"),
    (FisherReply, tampered(FISHER, num_examples=math.nan), "num-examples", "got nan"),
    (FisherReply, tampered(FISHER, num_examples=[1.0]), "num-examples", "positive finite count"),
    (FisherReply, tampered(FISHER, arrays=False), "arrays", "got missing"),
    (ValidationReply, tampered(NOISED, arrays=False, noise_multiplier=math.nan), "noise-multiplier", "got nan"),
    (ValidationReply, tampered(NOISED, arrays=False, noise_multiplier=0.0), "noise-multiplier", "> 0"),
    (ValidationReply, tampered(NOISED, arrays=False, delta=None), "delta", "got missing"),
    (ValidationReply, tampered(NOISED, arrays=False, delta=2.0), "delta", "(0, 1)"),
    (ValidationReply, tampered(NOISED, arrays=False, steps=2.5), "steps", "whole"),
    (ValidationReply, tampered(EXACT, arrays=False, total=[30]), "total", "must be a number"),
    (CensusReply, tampered(CENSUS, arrays=False, num_examples=None), "num-examples", "got missing"),
    (CensusReply, tampered(CENSUS, arrays=False, num_examples=2.5), "num-examples", "whole number of records"),
    (CensusReply, tampered(CENSUS, arrays=False, num_examples=0), "num-examples", "1..1e+09"),
    (CensusReply, tampered(CENSUS, arrays=False, num_examples=10**12), "num-examples", "got 1000000000000"),
    (CensusReply, tampered(CENSUS, arrays=False, site={}), "site.institution", "got missing"),
    (CensusReply, tampered(CENSUS, arrays=False, site={"institution": 7}), "site.institution", "got 7"),
    (CensusReply, tampered(CENSUS, arrays=False, site={"institution": "a\nb"}), "site.institution", "printable"),
    (CensusReply, tampered(CENSUS, arrays=False, site={"institution": "x" * 201}), "site.institution", "200"),
]


@pytest.mark.parametrize("kind,content,key,words", MALICIOUS,
                         ids=[f"{k.__name__}-{key}-{w}" for k, _, key, w in MALICIOUS])
def test_a_malformed_reply_is_refused_naming_the_key(kind, content, key, words):
    with pytest.raises(ReplyError) as refused:
        kind.parse(content)
    assert refused.value.key == key and str(refused.value).startswith(f"{key} must be ")
    assert words in str(refused.value), str(refused.value)


def test_privacy_claims_are_not_refused_by_the_schema_but_read_as_missing_when_invalid():
    """The coordinator charges an invalid claim at its plan (reply_trust.charge): parse keeps the
    reply, with the claim as None; claim_ok is the one validity rule both use."""
    got = TrainReply.parse(tampered(TRAIN, noise_multiplier=math.nan, sample_rate=1.5, steps=2.5, delta=None))
    assert (got.noise_multiplier, got.sample_rate, got.steps, got.delta) == (None, None, None, None)
    assert TrainReply.claim_ok("noise_multiplier", 0.0) and not TrainReply.claim_ok("noise_multiplier", -0.1)
    assert not TrainReply.claim_ok("steps", 10**8) and FisherReply.claim_ok("fisher_sample_rate", 1.0)


def test_exact_validation_counts_carry_no_release_and_non_finite_counts_are_unusable():
    assert ValidationReply.parse(tampered(EXACT, arrays=False, delta=5.0)).counts == (17.0, 30.0)  # delta unread
    noised = ValidationReply.parse(tampered(NOISED, arrays=False, correct=math.nan, steps=None))
    assert noised.counts is None and noised.steps == 1 and noised.noise_multiplier == 4.0  # still a release


# -- through the coordinator: the refused reply is left out, the round completes ----------------------
def reply_message(node: int, content: RecordDict, kind: str = "train") -> Message:
    sent = Metadata(run_id=1, message_id=f"m{node}", src_node_id=0, dst_node_id=node, reply_to_message_id="",
                    group_id="1", created_at=time.time(), ttl=3600, message_type=kind)
    return Message(content, reply_to=Message(RecordDict({"config": ConfigRecord({})}), metadata=sent))


def honest(node: int) -> TrainReply:
    return TrainReply(num_examples=100, institution=f"bank_{node}", noise_multiplier=1.0, sample_rate=0.125,
                      steps=2, delta=1e-5, bytes_up=576, train_loss_last=1.0)


def shifted(node: int) -> ArrayRecord:
    return ArrayRecord({k: Array(v + 0.01 * node) for k, v in GLOBAL.items()})


@pytest.mark.parametrize("metrics,words", [
    ({"num_examples": [100.0, 1e12]}, "num-examples must be a positive finite count"),  # crashed the round before
    ({"bytes_up": -10**9}, "bytes-up must be a whole, finite count >= 0"),
    ({"num_examples": math.nan}, "num-examples must be a positive finite count, got nan"),
])
def test_the_strategy_leaves_a_malformed_train_reply_out_and_logs_its_claims(metrics, words):
    s = AdapterFedAvg(3)
    s.sent = {k: v.copy() for k, v in GLOBAL.items()}
    bad = over_the_wire(RecordDict({"arrays": shifted(3), **{k: v for k, v in tampered(honest(3), **metrics).items()
                                                            if k != "arrays"}}))
    arrays, summary = s.aggregate_train(1, [reply_message(1, honest(1).to_records(shifted(1))),
                                            reply_message(2, honest(2).to_records(shifted(2))),
                                            reply_message(3, bad)])
    log = {e["institution"]: e for e in s.round_log[1]}
    assert log["bank_3"]["rejected"].startswith(f"malformed reply: {words}"), log["bank_3"]
    assert log["bank_3"]["steps"] == 2 and log["bank_3"]["noise_multiplier"] == 1.0  # still charged
    assert "rejected" not in log["bank_1"] and "rejected" not in log["bank_2"]
    assert summary["num-examples"] == 200
    np.testing.assert_allclose(to_arrays(arrays)["layer.lora_A.weight"], GLOBAL["layer.lora_A.weight"] + 0.015,
                               rtol=1e-6)


def test_fisher_aggregation_leaves_a_malformed_fisher_reply_out_naming_the_key():
    reference = {k: np.zeros_like(v) for k, v in GLOBAL.items()}
    diagonal = ArrayRecord({k: Array(np.abs(v)) for k, v in GLOBAL.items()})  # a Fisher diagonal is >= 0
    ok = FisherReply(num_examples=100, institution="bank_a", bytes_up=576).to_records(diagonal)
    bad = tampered(FisherReply(num_examples=100, institution="bank_b", bytes_up=576), num_examples=[100.0])
    trust = ReplyTrust({11: 100, 12: 100})
    names = {11: "bank_a", 12: "bank_b"}
    entry, fisher = fisher_reply(reply_message(11, ok, "train.fisher"), 11, names, trust, reference, 10**6)
    assert fisher is not None and "rejected" not in entry
    entry, fisher = fisher_reply(reply_message(12, bad, "train.fisher"), 12, names, trust, reference, 10**6)
    assert fisher is None and "malformed reply: num-examples must be a positive finite count" in entry["rejected"]


def test_the_schema_imports_only_flower_and_the_config():
    tree = ast.parse(Path(replies.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m.startswith("fedseek")} <= {"fedseek.config"}, imported
    assert not {m for m in imported if m.split(".")[0] in ("torch", "opacus", "mlflow", "sqlalchemy", "ray")}
