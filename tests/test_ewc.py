"""EWC math (hand-computed cases), online decay, and the DP-correct gradient path."""
import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedseek.config import EWCSettings
from fedseek.continual.ewc import (EWCState, add_penalty_gradient, consolidate, normalise_fisher, penalty,
                                   penalty_gradient)


def test_penalty_and_gradient_match_hand_computed_case():
    theta = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}
    state = EWCState([{"w": torch.tensor([2.0, 0.5]), "b": torch.tensor([4.0])}],
                     [{"w": torch.tensor([0.0, 1.0]), "b": torch.tensor([0.0])}])
    # λ/2 Σ F (θ-θ*)² = 3/2 * (2*1 + 0.5*1 + 4*0.25) = 5.25
    assert float(penalty(theta, state, lam=3.0)) == pytest.approx(5.25)
    grad = penalty_gradient(theta, state, lam=3.0)  # λ F (θ-θ*)
    assert torch.allclose(grad["w"], torch.tensor([6.0, 1.5]))
    assert torch.allclose(grad["b"], torch.tensor([6.0]))
    # and it is the autograd gradient of the penalty
    leaf = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    penalty(leaf, state, 3.0).backward()
    assert torch.allclose(leaf["w"].grad, grad["w"]) and torch.allclose(leaf["b"].grad, grad["b"])


def test_separate_ewc_keeps_one_term_per_period_and_sums_them():
    settings = EWCSettings(method="ewc")
    state = consolidate(EWCState(), {"w": torch.ones(1)}, {"w": torch.zeros(1)}, settings)
    state = consolidate(state, {"w": 2 * torch.ones(1)}, {"w": torch.ones(1)}, settings)
    assert len(state) == 2
    # λ [1*(3-0) + 2*(3-1)] = 7 at θ = 3, λ = 1
    assert float(penalty_gradient({"w": torch.tensor([3.0])}, state, 1.0)["w"]) == pytest.approx(7.0)


def test_online_ewc_decays_the_running_fisher_and_moves_the_anchor():
    settings = EWCSettings(method="online-ewc", gamma=0.5)
    state = consolidate(EWCState(), {"w": torch.tensor([4.0])}, {"w": torch.tensor([1.0])}, settings)
    state = consolidate(state, {"w": torch.tensor([2.0])}, {"w": torch.tensor([3.0])}, settings)
    state = consolidate(state, {"w": torch.tensor([1.0])}, {"w": torch.tensor([5.0])}, settings)
    assert len(state) == 1
    assert float(state.fishers[0]["w"]) == pytest.approx(0.5 * (0.5 * 4 + 2) + 1)  # 3.0
    assert float(state.anchors[0]["w"]) == 5.0


def test_state_round_trips_through_flat_tensors():
    state = EWCState([{"a.b": torch.ones(2, 3)}, {"a.b": torch.zeros(2, 3)}],
                     [{"a.b": torch.full((2, 3), 2.0)}, {"a.b": torch.full((2, 3), 3.0)}])
    back = EWCState.from_flat(state.to_flat())
    assert len(back) == 2 and torch.equal(back.anchors[1]["a.b"], state.anchors[1]["a.b"])
    assert torch.equal(back.fishers[0]["a.b"], state.fishers[0]["a.b"])


def test_normalised_fisher_has_mean_one():
    fisher = normalise_fisher({"a": torch.tensor([1e-6, 3e-6]), "b": torch.tensor([[2e-6]])})
    values = torch.cat([t.flatten() for t in fisher.values()])
    assert float(values.mean()) == pytest.approx(1.0)
    assert torch.allclose(fisher["a"], torch.tensor([0.5, 1.5]))


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="not one of"):
        EWCSettings(method="si")
    with pytest.raises(ValueError):
        EWCSettings(lam=-1.0)


def _dp_step(extra_loss: bool, hook: bool, lam: float = 50.0) -> torch.Tensor:
    """One DP-SGD step of a linear model whose anchor θ* is far away from θ."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, bias=False)
    anchor = {"weight": model.weight.detach() + 3.0}
    state = EWCState([{"weight": torch.ones_like(model.weight)}], [anchor])
    private = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    optimizer = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), noise_multiplier=1.0,
                            max_grad_norm=1.0, expected_batch_size=8)
    named = dict(model.named_parameters())
    if hook:
        optimizer.attach_step_hook(lambda _: add_penalty_gradient(named, state, lam))
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    loss = torch.nn.functional.mse_loss(private(x), y)
    if extra_loss:  # the tempting, wrong way: a loss term Opacus never sees per sample
        loss = loss + penalty(named, state, lam)
    torch.manual_seed(1)  # identical noise draws in every variant
    loss.backward()
    optimizer.step()
    return (model.weight.detach() - anchor["weight"]).norm()


def test_dp_path_applies_the_ewc_gradient_after_noise_and_pulls_towards_anchor():
    plain = _dp_step(extra_loss=False, hook=False)
    with_hook = _dp_step(extra_loss=False, hook=True)
    assert with_hook < plain - 0.5, "EWC gradient added after the noise step must move θ towards θ*"
    # Opacus drops a penalty that is only in the loss: the update is the same as without it
    as_loss = _dp_step(extra_loss=True, hook=False)
    assert float(as_loss) == pytest.approx(float(plain), abs=1e-5)
