"""Continual-learning metrics over an accuracy matrix (pure numpy).

a[i][j] is the accuracy on period j's test split after training period i (DESIGN.md section 3):
ACC = mean_j a[T][j]; BWT = mean_{j<T} (a[T][j] - a[j][j]);
Forgetting = mean_{j<T} (max_{l<T} a[l][j] - a[T][j]).
"""
from __future__ import annotations

import numpy as np


def _matrix(accuracy) -> np.ndarray:
    a = np.asarray(accuracy, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square and non-empty, got shape {a.shape}")
    return a


def average_accuracy(accuracy) -> float:
    a = _matrix(accuracy)
    return float(a[-1].mean())


def backward_transfer(accuracy) -> float:
    a = _matrix(accuracy)
    t = a.shape[0] - 1
    return float(np.mean([a[t, j] - a[j, j] for j in range(t)])) if t else 0.0


def forgetting(accuracy) -> float:
    a = _matrix(accuracy)
    t = a.shape[0] - 1
    return float(np.mean([a[:t, j].max() - a[t, j] for j in range(t)])) if t else 0.0
