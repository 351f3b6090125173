"""Differentially private diagonal Fisher from per-sample gradients — pure torch.

The empirical Fisher diagonal E[g ⊙ g] computed on private records is a release. Each record's
gradient is clipped to norm C, squared, and summed over a Poisson sample; Gaussian noise is added
to the sums. One record changes the vector of sums by g ⊙ g, whose L2 norm is at most
‖g‖² ≤ C², so noise N(0, (σ_F C²)²) makes one Fisher pass a subsampled Gaussian mechanism with
noise multiplier σ_F — the accountant charges it as one step (σ_F, q_F).

Granularity: per coordinate the signal-to-noise ratio is hopeless (~N / (σ_F · d) for d ≈ 50k
adapter coordinates), so by default one value is released per tensor (`tensor`) or per tensor row
(`row`) and spread evenly over its coordinates; `coordinate` is for non-DP use.
"""
from __future__ import annotations

import torch

Tensors = dict[str, torch.Tensor]


def clipped_square_sums(grad_samples: Tensors, clip_norm: float) -> Tensors:
    """Σ_records (clip(g_r))² per coordinate; `grad_samples[name]` has shape (records, *param)."""
    squares = [g.flatten(1).pow(2).sum(1) for g in grad_samples.values()]
    norms = torch.stack(squares).sum(0).sqrt()
    factor = (clip_norm / (norms + 1e-12)).clamp(max=1.0)
    return {n: (g * factor.view(-1, *[1] * (g.dim() - 1))).pow(2).sum(0)
            for n, g in grad_samples.items()}


def group_sums(sums: Tensors, granularity: str) -> Tensors:
    """Collapse coordinate sums to the released groups."""
    if granularity == "tensor":
        return {n: s.sum().reshape(1) for n, s in sums.items()}
    if granularity == "row":
        return {n: s.reshape(s.shape[0], -1).sum(1) if s.dim() > 1 else s.sum().reshape(1)
                for n, s in sums.items()}
    return {n: s.clone() for n, s in sums.items()}


def add_noise(groups: Tensors, std: float, generator: torch.Generator | None = None) -> Tensors:
    return {n: g + std * torch.randn(g.shape, generator=generator, dtype=g.dtype) for n, g in groups.items()}


def expand(groups: Tensors, shapes: dict[str, torch.Size], granularity: str, count: float) -> Tensors:
    """Per-coordinate Fisher: each group's (noisy) sum / records / coordinates in the group,
    clamped at 0 (noise can push a sum negative; a Fisher diagonal is non-negative)."""
    fisher: Tensors = {}
    for name, value in groups.items():
        shape = shapes[name]
        value = value.clamp(min=0.0) / max(count, 1.0)
        if granularity == "tensor":
            fisher[name] = torch.full(shape, float(value) / max(1, shape.numel()))
        elif granularity == "row" and len(shape) > 1:
            per_row = shape.numel() // shape[0]
            fisher[name] = (value / per_row).view(-1, *[1] * (len(shape) - 1)).expand(shape).clone()
        elif granularity == "row":
            fisher[name] = torch.full(shape, float(value) / max(1, shape.numel()))
        else:
            fisher[name] = value.reshape(shape)
    return fisher


def weighted_fisher(fishers: list[Tensors], weights: list[float]) -> Tensors:
    """FedCurv-style aggregate: example-weighted mean of the institutions' Fisher diagonals."""
    total = float(sum(weights))
    if not fishers or total <= 0:
        raise ValueError("no Fisher diagonals (or zero total weight) to aggregate")
    return {n: sum(f[n] * (w / total) for f, w in zip(fishers, weights)) for n in fishers[0]}


def restrict_rows(fisher: Tensors, names: list[str], rows: list[int]) -> Tensors:
    """Keep the Fisher of `names` (head tensors, one row per label) on `rows` only, preserving each
    tensor's total: in a task-incremental period the other labels' rows were masked out of training,
    so they carry no information about it (public knowledge: post-processing, no privacy cost)."""
    out = dict(fisher)
    for name in names:
        tensor = fisher[name]
        kept = torch.zeros_like(tensor)
        kept[rows] = tensor[rows]
        total, remaining = float(tensor.sum()), float(kept.sum())
        out[name] = kept * (total / remaining) if remaining > 0 else kept
    return out
