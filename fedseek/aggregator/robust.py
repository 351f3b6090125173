"""Defences against bad or malicious adapter updates (pure numpy: no Flower, MLflow, SQL or Ray).

Each institution's reply is checked against the global adapter the coordinator sent this round
before anything is averaged:

- `validate_update`: the same tensor names, shapes and a floating dtype as the global adapter
  (the dtype may be narrower, never wider), finite values only, and at most `max_update_bytes`
  on the wire;
- `norm_outliers`: an update whose delta (update − global) has an L2 norm above
  `outlier_ratio` × the round's median delta norm is rejected (needs ≥ 3 updates);
- `clip_delta`: server-side clipping of each delta to L2 norm `clip_norm` (bounds, not rejects);
- the aggregation rule: `fedavg` (example-weighted mean), or coordinate-wise `trimmed-mean`
  (drop the `trim_fraction` largest and smallest values of every coordinate, average the rest)
  or `median`. The robust rules are unweighted: a client cannot buy influence by claiming more
  examples. They need every update in memory at once (fedavg streams).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedseek.aggregator.aggregation import StreamingAverage
from fedseek.config import RobustSettings

Tensors = Mapping[str, np.ndarray]


def update_bytes(update: Tensors) -> int:
    return int(sum(np.asarray(v).nbytes for v in update.values()))


def update_byte_limit(settings: RobustSettings, reference: Tensors) -> int:
    """Largest reply accepted: `max_update_bytes`, else 2x the global adapter's size + 64 KiB."""
    if settings.max_update_bytes:
        return settings.max_update_bytes
    return 2 * update_bytes(reference) + 64 * 1024


def validate_update(update: Tensors, reference: Tensors, max_bytes: int | None = None,
                    wire_bytes: int | None = None) -> str | None:
    """Why `update` cannot be averaged into `reference` (the global adapter), or None if it can.
    `wire_bytes` is the size of what arrived (a compressed payload before decoding)."""
    size = update_bytes(update) if wire_bytes is None else wire_bytes
    if max_bytes and size > max_bytes:
        return f"oversize: {size} bytes > limit {max_bytes}"
    missing, extra = sorted(set(reference) - set(update)), sorted(set(update) - set(reference))
    if missing or extra:
        return f"tensor names differ from the global adapter: missing {missing[:3]}, unexpected {extra[:3]}"
    for name, ref in reference.items():
        value, ref = np.asarray(update[name]), np.asarray(ref)
        if value.shape != ref.shape:
            return f"shape of {name}: {value.shape}, expected {ref.shape}"
        if value.dtype.kind != "f" or value.dtype.itemsize > ref.dtype.itemsize:
            return f"dtype of {name}: {value.dtype}, expected {ref.dtype}"
        if not np.all(np.isfinite(value)):
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            return f"non-finite values: {bad} NaN/Inf in {name}"
    return None


def validate_fisher(fisher: Tensors, reference: Tensors, max_bytes: int | None = None) -> str | None:
    """Why a Fisher diagonal cannot be aggregated, or None: the checks of `validate_update`, and no
    negative entry (clients clamp the noisy sums at 0; a negative Fisher would push parameters
    away from their anchor)."""
    reason = validate_update(fisher, reference, max_bytes)
    if reason:
        return reason
    for name, value in fisher.items():
        negative = int(np.count_nonzero(np.asarray(value) < 0))
        if negative:
            return f"negative values: {negative} in {name} (a Fisher diagonal is non-negative)"
    return None


def delta_norm(update: Tensors, reference: Tensors) -> float:
    """L2 norm of update − reference over all tensors (float64)."""
    total = 0.0
    for name, ref in reference.items():
        diff = np.asarray(update[name], dtype=np.float64) - np.asarray(ref, dtype=np.float64)
        total += float(np.sum(diff * diff))
    return math.sqrt(total)


def clip_delta(update: Tensors, reference: Tensors, clip_norm: float
               ) -> tuple[dict[str, np.ndarray], float]:
    """(reference + delta scaled to L2 norm ≤ clip_norm, the scale applied: 1.0 = unchanged)."""
    norm = delta_norm(update, reference)
    scale = 1.0 if clip_norm <= 0 or norm <= clip_norm else clip_norm / norm
    if scale == 1.0:
        return dict(update), 1.0
    out = {}
    for name, ref in reference.items():
        ref64 = np.asarray(ref, dtype=np.float64)
        out[name] = (ref64 + scale * (np.asarray(update[name], dtype=np.float64) - ref64)
                     ).astype(np.asarray(ref).dtype)
    return out, scale


def norm_outliers(norms: Sequence[float], ratio: float) -> list[bool]:
    """Which norms exceed `ratio` × the median norm (all False when off or with < 3 norms)."""
    if ratio <= 0 or len(norms) < 3:
        return [False] * len(norms)
    median = float(np.median(norms))
    return [n > ratio * median for n in norms]


def trim_count(n: int, trim_fraction: float) -> int:
    """Values cut from each end of a coordinate: floor(f·n), leaving at least one."""
    return min(int(math.floor(trim_fraction * n)), (n - 1) // 2)


def _stack(updates: Sequence[Tensors], name: str) -> np.ndarray:
    return np.stack([np.asarray(u[name], dtype=np.float64) for u in updates])


def trimmed_mean(updates: Sequence[Tensors], trim_fraction: float) -> dict[str, np.ndarray]:
    """Coordinate-wise mean after cutting the k = floor(f·n) largest and smallest values."""
    if not updates:
        raise ValueError("no updates to aggregate")
    k = trim_count(len(updates), trim_fraction)
    out = {}
    for name, first in updates[0].items():
        values = np.sort(_stack(updates, name), axis=0)
        out[name] = values[k:len(updates) - k].mean(axis=0).astype(np.asarray(first).dtype)
    return out


def coordinate_median(updates: Sequence[Tensors]) -> dict[str, np.ndarray]:
    """Coordinate-wise median (mean of the two middle values for an even count)."""
    if not updates:
        raise ValueError("no updates to aggregate")
    return {name: np.median(_stack(updates, name), axis=0).astype(np.asarray(first).dtype)
            for name, first in updates[0].items()}


class RobustAggregate:
    """`add(update, weight)` / `result()` for any rule; fedavg streams (one float64 adapter),
    the coordinate-wise rules keep the accepted updates until `result()`."""

    def __init__(self, settings: RobustSettings):
        self.settings = settings
        self.average = StreamingAverage()
        self.updates: list[Tensors] = []

    @property
    def count(self) -> int:
        return self.average.count if self.settings.rule == "fedavg" else len(self.updates)

    def add(self, update: Tensors, weight: float) -> None:
        if self.settings.rule == "fedavg":
            self.average.add(update, weight)
        else:
            self.updates.append(update)

    def result(self) -> dict[str, np.ndarray]:
        if self.settings.rule == "fedavg":
            return self.average.result()
        if self.settings.rule == "median":
            return coordinate_median(self.updates)
        return trimmed_mean(self.updates, self.settings.trim_fraction)
