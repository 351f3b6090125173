"""Pure aggregation math over adapter tensors (numpy only: no Flower, MLflow, SQL or Ray).

FedAvg of LoRA factors: averaging A and B separately is *not* the average of the updates B·A
(mean(B)·mean(A) != mean(B·A)). FFA-LoRA freezes A at a shared seeded value so only B is trained
and averaged, and then mean(B)·A == mean(B·A) exactly.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

Tensors = Mapping[str, np.ndarray]


class StreamingAverage:
    """Example-weighted mean built one update at a time: memory is one float64 adapter, however
    many institutions report (the whole list of updates is never held)."""

    def __init__(self):
        self.sums: dict[str, np.ndarray] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, update: Tensors, weight: float) -> None:
        if weight < 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {weight}")
        if self.count and set(update) != set(self.sums):
            raise ValueError(f"update {self.count} has tensors "
                             f"{sorted(set(update) ^ set(self.sums))[:5]} that others lack")
        for name, value in update.items():
            value = np.asarray(value)
            if not self.count:
                self.dtypes[name] = value.dtype
                self.sums[name] = np.zeros(value.shape, dtype=np.float64)
            elif self.sums[name].shape != value.shape:
                raise ValueError(f"update {self.count}: tensor {name} has shape {value.shape}, "
                                 f"expected {self.sums[name].shape}")
            self.sums[name] += weight * value.astype(np.float64, copy=False)
        self.total_weight += float(weight)
        self.count += 1

    def result(self) -> dict[str, np.ndarray]:
        if not self.count:
            raise ValueError("no updates to aggregate")
        if self.total_weight <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {self.total_weight}")
        return {name: (total / self.total_weight).astype(self.dtypes[name]) for name, total in self.sums.items()}


def weighted_average(updates: Iterable[Tensors], weights: Iterable[float]) -> dict[str, np.ndarray]:
    """Example-weighted mean of each named tensor; every update must carry the same names/shapes.
    Consumes `updates` one at a time (pass a generator to keep only one in memory)."""
    if isinstance(updates, Sequence) and isinstance(weights, Sequence) and len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    average = StreamingAverage()
    for update, weight in zip(updates, weights, strict=True):
        average.add(update, weight)
    return average.result()


def lora_pairs(tensors: Tensors) -> dict[str, tuple[str, str]]:
    """Map each adapted layer to its (lora_A, lora_B) tensor names."""
    pairs = {}
    for name in tensors:
        if ".lora_A." in name:
            partner = name.replace(".lora_A.", ".lora_B.")
            if partner in tensors:
                pairs[name.split(".lora_A.")[0]] = (name, partner)
    return pairs


def lora_update(a: np.ndarray, b: np.ndarray, scaling: float = 1.0) -> np.ndarray:
    """The weight change a LoRA pair applies to its base layer: scaling · B @ A."""
    return scaling * (np.asarray(b, dtype=np.float64) @ np.asarray(a, dtype=np.float64))


def aggregation_error(updates: Sequence[Tensors], weights: Sequence[float],
                      frozen_a: Tensors | None = None) -> float:
    """Relative Frobenius error between the update of the averaged factors and the average of the
    updates, over all LoRA pairs. 0 for FFA-LoRA (A frozen and shared, given as `frozen_a`)."""
    merged = {**(frozen_a or {}), **weighted_average(updates, weights)}
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    num = den = 0.0
    for layer, (a_name, b_name) in lora_pairs(merged).items():
        exact = sum(wi * lora_update({**(frozen_a or {}), **u}[a_name], u[b_name]) for wi, u in zip(w, updates))
        approx = lora_update(merged[a_name], merged[b_name])
        num += float(np.sum((approx - exact) ** 2))
        den += float(np.sum(exact ** 2))
    return float(np.sqrt(num / den)) if den > 0 else 0.0
