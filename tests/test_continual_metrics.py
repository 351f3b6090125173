"""CL metrics against a hand-computed accuracy matrix."""
from __future__ import annotations

import pytest

from fedseek.continual.metrics import average_accuracy, backward_transfer, forgetting

MATRIX = [[0.80, 0.10, 0.05],
          [0.60, 0.70, 0.10],
          [0.50, 0.65, 0.90]]


def test_metrics_by_hand():
    assert average_accuracy(MATRIX) == pytest.approx((0.50 + 0.65 + 0.90) / 3)
    assert backward_transfer(MATRIX) == pytest.approx(((0.50 - 0.80) + (0.65 - 0.70)) / 2)
    assert forgetting(MATRIX) == pytest.approx(((0.80 - 0.50) + (0.70 - 0.65)) / 2)


def test_single_period_and_bad_shapes():
    assert backward_transfer([[0.7]]) == 0.0 and forgetting([[0.7]]) == 0.0
    with pytest.raises(ValueError, match="square"):
        average_accuracy([[0.1, 0.2]])
