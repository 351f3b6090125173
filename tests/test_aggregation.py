"""Pure aggregation math: exact weighted means and the FFA-LoRA exactness of B·A."""
from __future__ import annotations

import numpy as np
import pytest

from fedseek.aggregator.aggregation import aggregation_error, lora_update, weighted_average


def test_weighted_average_is_exact():
    a = {"w": np.array([1.0, 2.0], dtype=np.float32), "b": np.array([[0.0]], dtype=np.float32)}
    b = {"w": np.array([4.0, 8.0], dtype=np.float32), "b": np.array([[3.0]], dtype=np.float32)}
    merged = weighted_average([a, b], [100, 300])
    np.testing.assert_array_equal(merged["w"], np.array([3.25, 6.5], dtype=np.float32))
    np.testing.assert_array_equal(merged["b"], np.array([[2.25]], dtype=np.float32))
    assert merged["w"].dtype == np.float32


def test_weighted_average_rejects_inconsistent_updates():
    with pytest.raises(ValueError, match="lack"):
        weighted_average([{"a": np.zeros(2)}, {"b": np.zeros(2)}], [1, 1])
    with pytest.raises(ValueError, match="shape"):
        weighted_average([{"a": np.zeros(2)}, {"a": np.zeros(3)}], [1, 1])
    with pytest.raises(ValueError, match="weights"):
        weighted_average([{"a": np.zeros(2)}], [0])
    with pytest.raises(ValueError, match="no updates"):
        weighted_average([], [])


def test_ffa_lora_aggregation_is_exact_and_naive_is_not():
    rng = np.random.default_rng(0)
    layer = "model.layers.0.self_attn.o_proj"
    shared_a = {f"{layer}.lora_A.default.weight": rng.normal(size=(4, 16))}
    naive = [{f"{layer}.lora_A.default.weight": rng.normal(size=(4, 16)),
              f"{layer}.lora_B.default.weight": rng.normal(size=(16, 4))} for _ in range(3)]
    ffa = [{f"{layer}.lora_B.default.weight": rng.normal(size=(16, 4))} for _ in range(3)]
    weights = [10, 20, 30]
    assert aggregation_error(naive, weights) > 0.1
    assert aggregation_error(ffa, weights, frozen_a=shared_a) < 1e-12
    merged_b = weighted_average(ffa, weights)[f"{layer}.lora_B.default.weight"]
    a = shared_a[f"{layer}.lora_A.default.weight"]
    exact = sum(w / 60 * lora_update(a, u[f"{layer}.lora_B.default.weight"]) for w, u in zip(weights, ffa))
    np.testing.assert_allclose(lora_update(a, merged_b), exact, atol=1e-12)
