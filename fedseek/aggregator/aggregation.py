"""Pure aggregation math over adapter tensors (numpy only: no Flower, MLflow, SQL or Ray).

FedAvg of LoRA factors: averaging A and B separately is *not* the average of the updates B·A
(mean(B)·mean(A) != mean(B·A)). FFA-LoRA freezes A at a shared seeded value so only B is trained
and averaged, and then mean(B)·A == mean(B·A) exactly.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Tensors = Mapping[str, np.ndarray]


def weighted_average(updates: Sequence[Tensors], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Example-weighted mean of each named tensor; every update must carry the same names/shapes."""
    if not updates:
        raise ValueError("no updates to aggregate")
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    w = w / w.sum()
    names = set(updates[0])
    out: dict[str, np.ndarray] = {}
    for i, update in enumerate(updates):
        if set(update) != names:
            raise ValueError(f"update {i} has tensors {sorted(set(update) ^ names)[:5]} that others lack")
        for name, value in update.items():
            value = np.asarray(value, dtype=np.float64)
            if name in out and out[name].shape != value.shape:
                raise ValueError(f"update {i}: tensor {name} has shape {value.shape}, "
                                 f"expected {out[name].shape}")
            out[name] = out.get(name, 0.0) + w[i] * value
    dtypes = {name: np.asarray(value).dtype for name, value in updates[0].items()}
    return {name: value.astype(dtypes[name]) for name, value in out.items()}


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
