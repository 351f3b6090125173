"""Seeded splits: stratified train/test holds and IID or Dirichlet(alpha) institution partitions."""
from __future__ import annotations

import numpy as np


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rest, held) indices with about `fraction` of every class held out (at least one row of
    every class with more than one row)."""
    rng = np.random.default_rng(seed)
    held = []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        count = int(round(fraction * len(rows)))
        if len(rows) > 1:
            count = min(max(count, 1), len(rows) - 1)
        held.extend(rows[:count])
    held = np.sort(np.array(held, dtype=int))
    rest = np.setdiff1d(np.arange(len(labels)), held)
    return rest, held


def partition(labels: np.ndarray, institutions: int, scheme: str = "iid", alpha: float = 0.5,
              seed: int = 0, min_size: int = 10) -> list[np.ndarray]:
    """Row indices per institution. `dirichlet` draws each class's shares across institutions
    from Dir(alpha) (smaller alpha = more skewed), redrawing until every institution has
    `min_size` rows, the usual recipe of the non-IID FL literature."""
    if institutions < 1:
        raise ValueError("institutions must be >= 1")
    n = len(labels)
    if n < institutions * min_size:
        raise ValueError(f"{n} rows cannot give {institutions} institutions {min_size} rows each; "
                         "lower --institutions or add data")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), institutions)]
    if scheme != "dirichlet":
        raise ValueError(f"unknown partition scheme {scheme!r}; use 'iid' or 'dirichlet'")
    if alpha <= 0:
        raise ValueError("alpha must be > 0")
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(institutions)]
        for label in np.unique(labels):
            rows = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(institutions, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(int)
            for part, chunk in zip(parts, np.split(rows, cuts)):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=int)) for p in parts]
    raise ValueError(f"Dirichlet(alpha={alpha}) could not give every institution {min_size} rows; "
                     "raise --alpha or lower --institutions")
