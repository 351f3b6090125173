"""Pure robust-aggregation math: update validation, server-side delta clipping, norm outliers,
coordinate-wise trimmed mean and median."""
from __future__ import annotations

import numpy as np
import pytest

from fedseek.aggregator.robust import (RobustAggregate, clip_delta, coordinate_median, delta_norm, norm_outliers,
                                      trim_count, trimmed_mean, update_byte_limit, validate_update)
from fedseek.config import RobustSettings

GLOBAL = {"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32)}


def good(scale: float = 0.1) -> dict:
    return {"a": np.full((2, 3), scale, np.float32), "b": np.ones(4, np.float32) + scale}


def test_validate_accepts_a_well_formed_update_and_float16():
    assert validate_update(good(), GLOBAL, 10_000) is None
    assert validate_update({k: v.astype(np.float16) for k, v in good().items()}, GLOBAL) is None


@pytest.mark.parametrize("update, words", [
    ({"a": np.full((2, 3), np.nan, np.float32), "b": np.ones(4, np.float32)}, "non-finite values: 6 NaN/Inf in a"),
    ({"a": np.zeros((2, 3), np.float32), "b": np.array([1, np.inf, 1, 1], np.float32)}, "non-finite values: 1"),
    ({"a": np.zeros((3, 2), np.float32), "b": np.ones(4, np.float32)}, "shape of a: (3, 2), expected (2, 3)"),
    ({"a": np.zeros((2, 3), np.float64), "b": np.ones(4, np.float32)}, "dtype of a: float64"),
    ({"a": np.zeros((2, 3), np.int32), "b": np.ones(4, np.float32)}, "dtype of a: int32"),
    ({"a": np.zeros((2, 3), np.float32)}, "missing ['b']"),
    ({**good(), "base.weight": np.zeros(2, np.float32)}, "unexpected ['base.weight']"),
])
def test_validate_names_what_is_wrong(update, words):
    reason = validate_update(update, GLOBAL, 10_000)
    assert reason is not None and words in reason, reason


def test_validate_rejects_oversize_by_wire_bytes():
    assert "oversize: 40 bytes > limit 39" in validate_update(good(), GLOBAL, 39)
    assert validate_update(good(), GLOBAL, 10_000, wire_bytes=10_001).startswith("oversize")
    settings = RobustSettings()
    assert update_byte_limit(settings, GLOBAL) == 2 * 40 + 65536
    assert update_byte_limit(RobustSettings(max_update_bytes=100), GLOBAL) == 100


def test_clip_delta_bounds_the_norm_and_keeps_direction():
    update = {"a": np.full((2, 3), 3.0, np.float32), "b": np.ones(4, np.float32) + 4.0}
    norm = delta_norm(update, GLOBAL)
    assert norm == pytest.approx(np.sqrt(6 * 9 + 4 * 16))
    clipped, scale = clip_delta(update, GLOBAL, 1.0)
    assert scale == pytest.approx(1.0 / norm)
    assert delta_norm(clipped, GLOBAL) == pytest.approx(1.0, rel=1e-5)
    assert clipped["a"].dtype == np.float32
    np.testing.assert_allclose(clipped["a"] / (clipped["b"][0] - 1), 3.0 / 4.0, rtol=1e-5)
    same, scale = clip_delta(good(0.01), GLOBAL, 1.0)
    assert scale == 1.0 and np.array_equal(same["a"], good(0.01)["a"])
    assert clip_delta(update, GLOBAL, 0.0)[1] == 1.0  # 0 = off


def test_norm_outliers():
    assert norm_outliers([1.0, 1.1, 0.9, 25.0], 5.0) == [False, False, False, True]
    assert norm_outliers([1.0, 50.0], 5.0) == [False, False]  # too few to judge
    assert norm_outliers([1.0, 1.0, 50.0], 0.0) == [False] * 3  # off


def test_trimmed_mean_and_median_ignore_one_extreme_client():
    honest = [good(0.1), good(0.2), good(0.3), good(0.4)]
    poisoned = {k: -10.0 * v for k, v in good(0.25).items()}
    updates = honest + [poisoned]
    assert trim_count(5, 0.2) == 1 and trim_count(2, 0.4) == 0 and trim_count(3, 0.49) == 1
    tm = trimmed_mean(updates, 0.2)  # per coordinate: drop min (poisoned) and max (0.4)
    np.testing.assert_allclose(tm["a"], 0.2, rtol=1e-6)
    med = coordinate_median(updates)
    np.testing.assert_allclose(med["a"], 0.2, rtol=1e-6)
    np.testing.assert_allclose(med["b"], 1.2, rtol=1e-6)
    assert tm["a"].dtype == np.float32
    mean = np.mean([u["a"] for u in updates], axis=0)
    assert mean[0, 0] < 0  # the plain mean is dragged past zero by the one client
    assert trimmed_mean(updates, 0.0)["a"][0, 0] == pytest.approx(mean[0, 0], rel=1e-6)


def test_robust_aggregate_dispatches_by_rule():
    updates = [good(0.1), good(0.2), {k: v * 100 for k, v in good(0.3).items()}]
    weights = [1.0, 1.0, 2.0]
    results = {}
    for rule in ("fedavg", "trimmed-mean", "median"):
        aggregate = RobustAggregate(RobustSettings(rule=rule, trim_fraction=0.34))
        for u, w in zip(updates, weights):
            aggregate.add(u, w)
        assert aggregate.count == 3
        results[rule] = aggregate.result()["a"][0, 0]
    assert results["fedavg"] == pytest.approx((0.1 + 0.2 + 2 * 30.0) / 4, rel=1e-5)
    assert results["median"] == pytest.approx(0.2) and results["trimmed-mean"] == pytest.approx(0.2)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="unknown aggregation rule"):
        RobustSettings(rule="krum")
    with pytest.raises(ValueError, match="trim_fraction"):
        RobustSettings(trim_fraction=0.5)
    with pytest.raises(ValueError, match="outlier_ratio"):
        RobustSettings(outlier_ratio=0.5)
    with pytest.raises(ValueError, match=">= 0"):
        RobustSettings(clip_norm=-1)
