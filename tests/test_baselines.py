"""bench/baselines.py on a tiny slice of banking77: the TF-IDF baseline learns, and the DP baseline's
eps (recomputed by the project's PRV accountant) stays within the target, with noise nobody can replay."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import baselines as bl  # noqa: E402

from fedseek.privacy.accountant import default_delta, epsilon  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    """Bank a's records of 8 intents (about 30 each) and the test queries of those intents."""
    data = bl.load_splits("banking77", 0)
    keep = np.arange(8)
    train, test = data.train[0], data.test
    train = train.subset(np.flatnonzero(np.isin(train.labels, keep)))
    test = test.subset(np.flatnonzero(np.isin(test.labels, keep)))
    train.label_names = test.label_names = train.label_names[:8]
    return train, test


def test_tfidf_beats_majority(tiny):
    train, test = tiny
    assert bl.majority(train, test) < 0.25
    assert bl.tfidf_lr(train, test) > bl.majority(train, test) + 0.4


def test_dp_linear_epsilon_within_target_and_noise_private(tiny):
    train, _ = tiny
    rule = bl.DPRule(batch=len(train) // 4, epochs=3, lr=2.0, clip=1.0)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)  # an attacker who knows the global seeds must still not replay the noise
        runs.append(bl.train_dp_linear(train, epsilon=8.0, rule=rule, n_features=256))
    (first, info), (second, _) = runs
    assert info["delta"] == default_delta(len(train))
    spent = epsilon([(info["sigma"], info["sample_rate"], info["steps"])], info["delta"])
    assert spent <= 8.0 and info["epsilon"] <= 8.0
    assert spent > 7.5  # the noise was calibrated to the budget, not over-noised
    assert info["steps"] == 3 * round(1 / info["sample_rate"])
    assert not torch.equal(first.weight, second.weight)  # same data, same seeds: different noise
