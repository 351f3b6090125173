"""Elastic Weight Consolidation over the trainable (LoRA + head) tensors — pure torch.

penalty(θ) = λ/2 Σ_k Σ_i F_k,i (θ_i − θ*_k,i)²,   gradient = λ Σ_k F_k ⊙ (θ − θ*_k)

*Separate* EWC keeps one (F_k, θ*_k) per past period; *online* EWC keeps one γ-decayed running
Fisher F ← γ F + F_new anchored at the latest θ* (Schwarz et al., 2018).

Under DP-SGD the penalty must not go through the loss: Opacus computes per-sample gradients from
the forward pass only, so a loss term added afterwards is silently dropped (Opacus #249/#259).
`add_penalty_gradient` writes the gradient into `p.grad` after clipping and noise (the trainer
calls it from the DP optimizer's step hook). It reads only θ and the released (F, θ*), so it costs
no privacy.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedseek.config import EWCSettings

Tensors = dict[str, torch.Tensor]


@dataclass
class EWCState:
    """What protects earlier periods: one (Fisher, anchor) pair per past period (separate EWC) or a
    single running pair (online EWC)."""

    fishers: list[Tensors] = field(default_factory=list)
    anchors: list[Tensors] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.fishers)

    def to_flat(self) -> Tensors:
        """`fisher/<k>/<name>` and `anchor/<k>/<name>` tensors, for shipping to institutions."""
        flat: Tensors = {}
        for k, (fisher, anchor) in enumerate(zip(self.fishers, self.anchors)):
            flat.update({f"fisher/{k}/{n}": t for n, t in fisher.items()})
            flat.update({f"anchor/{k}/{n}": t for n, t in anchor.items()})
        return flat

    @classmethod
    def from_flat(cls, flat: Tensors) -> "EWCState":
        count = 1 + max((int(key.split("/")[1]) for key in flat), default=-1)
        state = cls([{} for _ in range(count)], [{} for _ in range(count)])
        for key, tensor in flat.items():
            kind, k, name = key.split("/", 2)
            (state.fishers if kind == "fisher" else state.anchors)[int(k)][name] = tensor
        return state


def consolidate(state: EWCState, fisher: Tensors, anchor: Tensors, settings: EWCSettings) -> EWCState:
    """The state after a period ends with parameters `anchor` and Fisher diagonal `fisher`."""
    fisher = {n: t.detach().clone().float() for n, t in fisher.items()}
    anchor = {n: t.detach().clone().float() for n, t in anchor.items()}
    if settings.method == "online-ewc" and len(state):
        running = {n: settings.gamma * state.fishers[0][n] + fisher[n] for n in fisher}
        return EWCState([running], [anchor])
    if settings.method == "online-ewc":
        return EWCState([fisher], [anchor])
    return EWCState(state.fishers + [fisher], state.anchors + [anchor])


def penalty(params: Tensors, state: EWCState, lam: float) -> torch.Tensor:
    """λ/2 Σ_k Σ_i F_k,i (θ_i − θ*_k,i)² (differentiable; for non-DP use and for checks)."""
    total = torch.zeros(())
    for fisher, anchor in zip(state.fishers, state.anchors):
        for name, value in params.items():
            if name in fisher:
                total = total + (fisher[name] * (value - anchor[name]) ** 2).sum()
    return 0.5 * lam * total


@torch.no_grad()
def penalty_gradient(params: Tensors, state: EWCState, lam: float) -> Tensors:
    """λ Σ_k F_k ⊙ (θ − θ*_k) for every parameter that some period protects."""
    grads: Tensors = {}
    for fisher, anchor in zip(state.fishers, state.anchors):
        for name, value in params.items():
            if name in fisher:
                device = value.device
                term = lam * fisher[name].to(device) * (value.detach().float() - anchor[name].to(device))
                grads[name] = grads[name] + term if name in grads else term
    return grads


@torch.no_grad()
def add_penalty_gradient(named_params: dict[str, torch.nn.Parameter], state: EWCState, lam: float) -> None:
    """p.grad += λ Σ_k F_k ⊙ (p − θ*_k); call after the DP noise step, before the update."""
    if not len(state) or lam == 0:
        return
    for name, grad in penalty_gradient(named_params, state, lam).items():
        p = named_params[name]
        p.grad = grad.to(p.dtype) if p.grad is None else p.grad + grad.to(p.grad.dtype)


def normalise_fisher(fisher: Tensors) -> Tensors:
    """Scale so the mean over all coordinates is 1 (post-processing; keeps λ model-independent)."""
    total = sum(float(t.sum()) for t in fisher.values())
    count = sum(t.numel() for t in fisher.values())
    scale = count / total if total > 0 else 0.0
    return {n: t * scale for n, t in fisher.items()}
