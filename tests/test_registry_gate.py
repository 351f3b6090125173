"""The promotion gate: champion moves only for better-or-equal accuracy, bounded forgetting/BWT
and every institution within budget; each answer carries its reason."""
from __future__ import annotations

from fedseek.platform.mlflow.registry import Limits, gate


def test_gate_decisions_and_reasons():
    limits = Limits(max_forgetting=0.05, min_bwt=-0.05)
    assert gate({"accuracy": "0.40"}, None, [], limits) == (True, "first version (accuracy 0.4000); no champion yet")
    assert gate({"accuracy": "0.40"}, {"accuracy": "0.40"}, [], limits)[0] is True  # ties promote
    assert gate({"accuracy": "0.39"}, {"accuracy": "0.40"}, [], limits) == (
        False, "accuracy 0.3900 < champion's 0.4000")
    assert gate({"accuracy": "0.50", "forgetting": "0.08"}, {"accuracy": "0.40"}, [], limits) == (
        False, "forgetting 0.0800 > limit 0.05")
    assert gate({"accuracy": "0.50", "forgetting": "0.01", "bwt": "-0.07"}, None, [], limits) == (
        False, "BWT -0.0700 < limit -0.05")
    assert gate({"accuracy": "0.50"}, None, ["bank_a (epsilon 9.100 > 9)"], limits) == (
        False, "privacy budget exceeded by bank_a (epsilon 9.100 > 9)")
