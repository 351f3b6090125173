"""The strategy on real Flower reply messages: NaN/Inf, wrong shapes/dtypes, missing tensors,
oversize and malformed replies are rejected and logged per institution while the round still
aggregates the valid ones; a scaled, sign-flipped (poisoned) update is bounded by server-side
clipping or out-voted by trimmed mean / median."""
from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from fedseek.aggregator.robust import delta_norm
from fedseek.aggregator.strategy import AdapterFedAvg
from fedseek.config import CompressionSettings, RobustSettings
from fedseek.wire.arrays import to_arrays
from fedseek.wire.compression import compress, delta_between

RNG = np.random.default_rng(0)
GLOBAL = {"layer.lora_A.weight": RNG.normal(size=(4, 16)).astype(np.float32),
          "layer.lora_B.weight": np.zeros((16, 4), np.float32),
          "score.modules_to_save.weight": RNG.normal(size=(5, 16)).astype(np.float32)}


def instruction(node: int) -> Message:
    """A train instruction as the SuperLink delivers it to node `node`."""
    metadata = Metadata(run_id=1, message_id=f"m{node}", src_node_id=0, dst_node_id=node,
                        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600,
                        message_type="train")
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}),
                               "config": ConfigRecord({"server-round": 1})}), metadata=metadata)


def reply(node: int, tensors: dict, examples: int = 100, name: str | None = None, loss: float = 1.0) -> Message:
    """What client_app.train returns: arrays, metrics and the site's name."""
    arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in tensors.items()})
    metrics = MetricRecord({"num-examples": examples, "train-loss-last": loss,
                            "bytes-up": sum(int(np.asarray(v).nbytes) for v in tensors.values()),
                            "noise-multiplier": 1.0, "sample-rate": 0.125, "steps": 12, "delta": 1e-5})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics,
                               "site": ConfigRecord({"institution": name or f"bank_{node}"})}),
                   reply_to=instruction(node))


COMMON = {k: 0.02 * RNG.normal(size=v.shape).astype(np.float32) for k, v in GLOBAL.items()}


def honest(seed: int) -> dict:
    """The global adapter + a direction all honest sites share + their own noise."""
    rng = np.random.default_rng(seed)
    return {k: v + COMMON[k] + 0.005 * rng.normal(size=v.shape).astype(np.float32) for k, v in GLOBAL.items()}


def strategy(robust: RobustSettings | None = None, compression=None) -> AdapterFedAvg:
    s = AdapterFedAvg(5, compression, robust=robust)
    s.sent = {k: v.copy() for k, v in GLOBAL.items()}  # what configure_train keeps of this round
    return s


def log_of(s: AdapterFedAvg, server_round: int = 1) -> dict[str, dict]:
    return {e["institution"]: e for e in s.round_log[server_round]}


def test_bad_replies_are_rejected_and_logged_while_the_round_completes():
    good = [honest(i) for i in range(3)]
    nan = {**honest(3), "layer.lora_B.weight": np.full((16, 4), np.nan, np.float32)}
    inf = {**honest(4), "score.modules_to_save.weight": np.full((5, 16), np.inf, np.float32)}
    shape = {**honest(5), "score.modules_to_save.weight": np.zeros((6, 16), np.float32)}
    dtype = {k: v.astype(np.float64) for k, v in honest(6).items()}
    missing = {k: v for k, v in honest(7).items() if "lora_A" not in k}
    oversize = {**honest(8), "model.embed_tokens.weight": np.zeros((4096, 64), np.float32)}
    replies = [reply(i + 1, u) for i, u in enumerate(good)] + [
        reply(11, nan, name="bank_nan"), reply(12, inf, name="bank_inf"), reply(13, shape, name="bank_shape"),
        reply(14, dtype, name="bank_dtype"), reply(15, missing, name="bank_missing"),
        reply(16, oversize, name="bank_oversize"), reply(17, honest(9), examples=0, name="bank_zero")]
    s = strategy()
    arrays, metrics = s.aggregate_train(1, replies)
    merged = to_arrays(arrays)
    for name in GLOBAL:
        np.testing.assert_allclose(merged[name], np.mean([u[name] for u in good], axis=0), rtol=1e-5, atol=1e-7)
    log = log_of(s)
    assert [n for n in log if "rejected" not in log[n]] == ["bank_1", "bank_2", "bank_3"]
    expected = {"bank_nan": "non-finite values: 64 NaN/Inf in layer.lora_B.weight",
                "bank_inf": "non-finite values: 80 NaN/Inf", "bank_shape": "shape of score.modules_to_save.weight",
                "bank_dtype": "dtype of", "bank_missing": "missing ['layer.lora_A.weight']",
                "bank_oversize": "oversize", "bank_zero": "num-examples must be a positive"}
    for name, words in expected.items():
        assert words in log[name]["rejected"], (name, log[name])
        assert log[name]["node_id"] > 10 and log[name]["steps"] == 12  # metrics kept: privacy is charged
    assert metrics["num-examples"] == 300.0


def test_malformed_reply_without_tensors_is_rejected_not_fatal():
    bare = Message(RecordDict({"metrics": MetricRecord({"num-examples": 5})}), reply_to=instruction(9))
    s = strategy()
    s.aggregate_train(1, [reply(1, honest(1)), reply(2, honest(2)), bare])
    log = log_of(s)
    assert "malformed reply" in log["node-9"]["rejected"]
    assert "rejected" not in log["bank_1"]


def test_a_round_of_only_bad_replies_fails_with_every_reason():
    s = strategy()
    nan = {k: np.full_like(v, np.nan) for k, v in GLOBAL.items()}
    with pytest.raises(RuntimeError, match="no valid update; bank_1: non-finite"):
        s.aggregate_train(1, [reply(1, nan)])
    assert "rejected" in log_of(s)["bank_1"]


def poisoned(seed: int, factor: float = -10.0) -> dict:
    """A sign-flipped, scaled update: global + factor x (an honest delta)."""
    return {k: GLOBAL[k] + factor * (v - GLOBAL[k]) for k, v in honest(seed).items()}


def clean_mean(n: int = 4) -> dict:
    return {k: np.mean([honest(i)[k] for i in range(n)], axis=0) for k in GLOBAL}


def error(arrays: ArrayRecord) -> float:
    merged = to_arrays(arrays)
    return delta_norm(merged, clean_mean()) / delta_norm(clean_mean(), GLOBAL)


@pytest.mark.parametrize("rule", ["trimmed-mean", "median"])
def test_robust_rules_outvote_one_poisoned_client(rule):
    replies = [reply(i + 1, honest(i)) for i in range(4)] + [reply(5, poisoned(4), name="bank_evil")]
    plain, robust = strategy(), strategy(RobustSettings(rule=rule, trim_fraction=0.2))
    assert error(plain.aggregate_train(1, replies)[0]) > 1.5  # FedAvg: moved against the honest mean
    assert error(robust.aggregate_train(1, replies)[0]) < 0.3


def test_server_clip_bounds_a_scaled_update_and_logs_it():
    replies = [reply(i + 1, honest(i)) for i in range(4)] + [reply(5, poisoned(4, -100.0), name="bank_evil")]
    s = strategy(RobustSettings(clip_norm=0.5))
    arrays, _ = s.aggregate_train(1, replies)
    merged = to_arrays(arrays)
    log = log_of(s)
    assert log["bank_evil"]["clipped"] > 20 and "clipped" not in log["bank_1"]
    assert "rejected" not in log["bank_evil"]
    assert delta_norm(merged, GLOBAL) <= 0.5 + 1e-5  # a mean of deltas each of norm <= 0.5
    assert error(strategy().aggregate_train(1, replies)[0]) > 10 * error(arrays)


def test_norm_outlier_is_rejected():
    replies = [reply(i + 1, honest(i)) for i in range(4)] + [reply(5, poisoned(4), name="bank_evil")]
    s = strategy(RobustSettings(outlier_ratio=3.0))
    arrays, _ = s.aggregate_train(1, replies)
    assert "norm outlier" in log_of(s)["bank_evil"]["rejected"]
    assert error(arrays) < 1e-5


def test_compressed_replies_are_validated_after_decoding():
    settings = CompressionSettings(codec="int8")
    payloads = [compress(delta_between(honest(i), GLOBAL), settings)[0] for i in range(3)]
    bad = dict(payloads[0])
    name = next(k for k in bad if k.endswith("#scale"))
    bad[name] = np.full_like(bad[name], np.nan)
    s = strategy(compression=settings)
    arrays, _ = s.aggregate_train(1, [reply(i + 1, p) for i, p in enumerate(payloads)] + [reply(9, bad, name="bank_nan")])
    assert "non-finite" in log_of(s)["bank_nan"]["rejected"]
    assert np.all(np.isfinite(to_arrays(arrays)["layer.lora_A.weight"]))
    assert error(arrays) < 0.3  # the three honest clients' decoded deltas vs the 4-client mean


def test_a_silent_institution_is_logged_as_dropped_and_the_minimum_is_enforced():
    """The strategy sent to nodes 1-3 (what configure_train records); node 3 never answered
    within the round timeout. With a minimum of 2 the round completes and names the dropout;
    with a minimum of 3 it stops, naming who is missing."""
    names = {1: "hospital_a", 2: "hospital_b", 3: "hospital_c"}
    lenient = AdapterFedAvg(3, robust=None, node_names=names, min_institutions=2)
    lenient.sent, lenient.expected = {k: v.copy() for k, v in GLOBAL.items()}, {1, 2, 3}
    arrays, _ = lenient.aggregate_train(1, [reply(1, honest(1), name="hospital_a"),
                                            reply(2, honest(2), name="hospital_b")])
    assert arrays is not None
    assert lenient.dropped_log[1] == [{"node_id": 3, "institution": "hospital_c",
                                       "reason": "no reply within the round timeout"}]
    strict = AdapterFedAvg(3, node_names=names, min_institutions=3)
    strict.sent, strict.expected = {k: v.copy() for k, v in GLOBAL.items()}, {1, 2, 3}
    with pytest.raises(RuntimeError, match="2 institutions answered, the job needs 3; dropped: hospital_c"):
        strict.aggregate_train(1, [reply(1, honest(1)), reply(2, honest(2))])


def test_a_superlink_node_unavailable_reply_is_attributed_to_the_node_it_answers_for():
    """When a node stops heartbeating, the SuperLink itself answers its pending message with
    `Node Unavailable` (src node 1, the SuperLink's id). The dropout is the node the message went
    to, once, not a phantom `node-1` next to a "no reply" entry for the real node."""
    from flwr.app import Error

    names = {11: "bank_a", 12: "bank_b", 13: "bank_c"}
    strategy = AdapterFedAvg(3, node_names=names, min_institutions=2)
    strategy.sent = {k: v.copy() for k, v in GLOBAL.items()}
    strategy.outgoing = [instruction(node) for node in names]
    strategy.expected = set(names)
    unavailable = Message(Error(code=3, reason="Error: Node Unavailable"), metadata=Metadata(
        run_id=1, message_id="", src_node_id=1, dst_node_id=0, reply_to_message_id="m13", group_id="1",
        created_at=time.time(), ttl=3600, message_type="train"))
    arrays, _ = strategy.aggregate_train(2, [reply(11, honest(11), name="bank_a"),
                                             reply(12, honest(12), name="bank_b"), unavailable])
    assert arrays is not None
    assert strategy.dropped_log[2] == [{"node_id": 13, "institution": "bank_c", "reason": "Error: Node Unavailable"}]
