"""Update compression codecs: round-trip error bounds, bytes, error feedback, streaming FedAvg."""
from __future__ import annotations

import numpy as np
import pytest

from fedseek.aggregator.aggregation import StreamingAverage, weighted_average
from fedseek.config import CompressionSettings
from fedseek.wire.compression import apply_delta, compress, decode, delta_between, encode, payload_bytes


def adapter_like(seed: int = 0) -> dict[str, np.ndarray]:
    """Shapes of the embedded model's adapter: LoRA A (r x in), B (out x r), head (labels x hidden)."""
    rng = np.random.default_rng(seed)
    return {"q_b_proj.lora_A.default.weight": rng.normal(0, 0.02, (16, 96)).astype(np.float32),
            "q_b_proj.lora_B.default.weight": rng.normal(0, 0.01, (192, 16)).astype(np.float32),
            "score.modules_to_save.default.weight": rng.normal(0, 0.05, (77, 256)).astype(np.float32),
            "norm.bias": rng.normal(0, 0.1, (7,)).astype(np.float32)}


def roundtrip(delta, **settings):
    payload = encode(delta, CompressionSettings(**settings))
    return payload, decode(payload, delta)


def test_none_is_lossless_and_fp16_within_half_precision():
    delta = adapter_like()
    payload, back = roundtrip(delta)
    assert payload_bytes(payload) == sum(v.nbytes for v in delta.values())
    for k in delta:
        np.testing.assert_array_equal(back[k], delta[k])
    payload, back = roundtrip(delta, codec="fp16")
    assert payload_bytes(payload) * 2 == sum(v.nbytes for v in delta.values())
    for k in delta:
        np.testing.assert_allclose(back[k], delta[k], rtol=2 ** -11, atol=1e-7)


@pytest.mark.parametrize("codec, levels, min_ratio, max_ratio", [("int8", 127, 3.9, 4.0), ("int4", 7, 7.5, 8.0)])
def test_integer_codecs_err_at_most_half_a_step_per_channel(codec, levels, min_ratio, max_ratio):
    delta = adapter_like()
    payload, back = roundtrip(delta, codec=codec)
    for k, x in delta.items():
        assert back[k].shape == x.shape and back[k].dtype == np.float32
        if x.ndim == 2:  # one scale per channel, along the longer axis
            axis = 1 if x.shape[1] >= x.shape[0] else 0
            step = np.max(np.abs(x), axis=axis, keepdims=True) / levels
        else:
            step = np.max(np.abs(x)) / levels
        assert np.all(np.abs(back[k] - x) <= step / 2 + 1e-9)
        assert np.abs(back[k] - x).max() > 0  # lossy: the bound is not met trivially
    ratio = sum(v.nbytes for v in delta.values()) / payload_bytes(payload)
    assert min_ratio < ratio < max_ratio


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_zero_and_odd_sized_tensors_survive(codec):
    delta = {"z": np.zeros((4, 8), np.float32), "s": np.zeros(3, np.float32),
             "odd": np.array([0.5, -1.0, 0.25], np.float32)}
    _, back = roundtrip(delta, codec=codec)
    assert np.all(back["z"] == 0) and np.all(back["s"] == 0)
    np.testing.assert_allclose(back["odd"], delta["odd"], atol=1.0 / 14 + 1e-7)
    _, back = roundtrip(delta, codec=codec, topk=0.5)  # top-k values packed as well
    assert back["odd"][1] == pytest.approx(-1.0) and back["odd"][2] == 0


def test_topk_keeps_the_largest_entries_and_a_bitmask():
    delta = adapter_like()
    payload, back = roundtrip(delta, codec="fp16", topk=0.1)
    for k, x in delta.items():
        kept = back[k] != 0
        assert kept.sum() == int(np.ceil(0.1 * x.size))
        # every dropped entry is no larger than the smallest kept one
        assert np.abs(x[~kept]).max(initial=0) <= np.abs(x[kept]).min() + 1e-7
        np.testing.assert_allclose(back[k][kept], x[kept], rtol=2 ** -11)
    dense = sum(v.nbytes for v in delta.values())
    assert dense / payload_bytes(payload) > 10  # 1 bit of mask + 10 % of 2-byte values per entry
    int8_topk, _ = roundtrip(delta, codec="int8", topk=0.25)
    assert dense / payload_bytes(int8_topk) > 8


def relative_error(sent, wanted) -> float:
    num = sum(float(np.sum((sent[k] - wanted[k]) ** 2)) for k in wanted)
    return (num / sum(float(np.sum(wanted[k] ** 2)) for k in wanted)) ** 0.5


def test_error_feedback_sends_the_dropped_part_later():
    delta = adapter_like()
    wanted = {k: 40 * v for k, v in delta.items()}
    totals = {}
    for feedback in (True, False):
        settings = CompressionSettings(codec="int8", topk=0.05, error_feedback=feedback)
        sent = {k: np.zeros_like(v) for k, v in delta.items()}
        residual = None
        for _ in range(40):  # the same delta every round: the sum sent should track the sum wanted
            payload, residual = compress(delta, settings, residual)
            for k, v in decode(payload, delta).items():
                sent[k] += v
        totals[feedback] = sent
        if feedback:  # nothing is lost: what was not sent yet is exactly the residual
            for k in delta:
                np.testing.assert_allclose(sent[k] + residual[k], wanted[k], atol=1e-4)
        else:
            assert residual == {}
    assert relative_error(totals[True], wanted) < 0.3
    assert relative_error(totals[False], wanted) > 0.6


def test_delta_roundtrip_reconstructs_the_trained_adapter():
    received, trained = adapter_like(0), adapter_like(1)
    payload, _ = compress(delta_between(trained, received), CompressionSettings(codec="int8"))
    rebuilt = apply_delta(received, decode(payload, received))
    for k in trained:
        assert rebuilt[k].dtype == np.float32
        np.testing.assert_allclose(rebuilt[k], trained[k], atol=np.abs(trained[k] - received[k]).max() / 250)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="codec"):
        CompressionSettings(codec="int3")
    with pytest.raises(ValueError, match="topk"):
        CompressionSettings(topk=1.5)
    assert not CompressionSettings().enabled and CompressionSettings(topk=0.1).enabled


def test_streaming_average_equals_the_list_average_from_a_generator():
    updates = [adapter_like(s) for s in range(20)]
    weights = list(range(1, 21))
    expected = {k: sum(w * u[k].astype(np.float64) for w, u in zip(weights, updates)) / sum(weights)
                for k in updates[0]}
    streamed = weighted_average((u for u in updates), (w for w in weights))
    stream = StreamingAverage()
    for u, w in zip(updates, weights):
        stream.add(u, w)
    for k in expected:
        np.testing.assert_allclose(streamed[k], expected[k], rtol=1e-6)
        np.testing.assert_array_equal(stream.result()[k], streamed[k])
    assert stream.count == 20 and streamed["norm.bias"].dtype == np.float32
    with pytest.raises(ValueError):
        weighted_average((u for u in updates), (w for w in weights[:3]))
