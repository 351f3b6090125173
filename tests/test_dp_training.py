"""Local DP-LoRA training with real Opacus on the embedded DeepSeek-V3 base.

Guards against the Opacus/PEFT combination that once silently corrupted LoRA weights: a few DP
steps must change the adapter, leave every frozen base weight bit-identical and lower the loss.
"""
from __future__ import annotations

import pytest
import torch

from fedseek.clients.dp_trainer import LocalTrainer, learning_rate
from fedseek.config import LoraSettings, OptimSettings, PrivacySettings
from fedseek.models.classifier import AdapterClassifier
from fedseek.privacy.accountant import epsilon


@pytest.fixture(scope="module")
def site(banking):
    records = banking.train[0]
    return records.texts[:600], records.labels[:600]


def run(settings: LoraSettings, site, privacy: PrivacySettings, rounds: int = 1, steps: int = 8):
    trainer = LocalTrainer(AdapterClassifier(None, 77, settings))
    data = trainer.classifier.encode(*site)
    model = trainer.classifier.model
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    before = trainer.classifier.evaluate(data)["loss"]
    history, results = [], []
    optim = OptimSettings(local_steps=steps, batch_fraction=0.25, learning_rate=1e-2, chunk_size=64)
    for server_round in range(1, rounds + 1):
        result = trainer.train_round(data, privacy, optim, server_round, rounds, history, seed=0)
        history = result.history
        results.append(result)
    after = trainer.classifier.evaluate(data)["loss"]
    return model, frozen, trained, before, after, results


def test_dp_step_trains_adapter_only_and_lowers_loss(site):
    model, frozen, trained, before, after, results = run(
        LoraSettings(rank=8, top_layers=2), site, PrivacySettings(noise_multiplier=0.6, clip_norm=1.0))
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items()), "a frozen base weight changed"
    changed = [n for n, v in trained.items() if not torch.equal(params[n], v)]
    assert any("lora_B" in n for n in changed) and any("score" in n for n in changed)
    assert len(changed) == len(trained)
    assert all(torch.isfinite(params[n]).all() for n in trained)
    assert after < before - 0.05, (before, after)
    assert results[0].epsilon > 0 and results[0].noise_multiplier == 0.6


def test_ffa_keeps_a_frozen_at_its_seeded_value(site):
    model, frozen, trained, before, after, _ = run(
        LoraSettings(rank=8, top_layers=2, ffa=True), site, PrivacySettings(noise_multiplier=0.6, clip_norm=1.0))
    assert trained and all("lora_A" not in n for n in trained)
    lora_a = {n: p for n, p in model.named_parameters() if "lora_A" in n}
    twin = AdapterClassifier(None, 77, LoraSettings(rank=8, top_layers=2, ffa=True)).model
    twin_a = dict(twin.named_parameters())
    assert lora_a and all(torch.equal(p, twin_a[n]) for n, p in lora_a.items())
    assert after < before


def test_epsilon_accumulates_over_rounds_within_target(site):
    *_, results = run(LoraSettings(rank=4, top_layers=1), site,
                      PrivacySettings(target_epsilon=3.0, clip_norm=1.0), rounds=3, steps=3)
    eps = [r.epsilon for r in results]
    assert eps[0] < eps[1] < eps[2] <= 3.0 + 1e-3
    assert eps[2] == pytest.approx(3.0, rel=0.02)  # sigma planned so the job ends at the target
    assert len(results[-1].history) == 3
    assert eps[2] == pytest.approx(epsilon(results[-1].history, results[-1].delta), rel=1e-9)


def test_no_dp_path_has_no_accounting(site):
    *_, results = run(LoraSettings(rank=4, top_layers=1), site, PrivacySettings(enabled=False), steps=3)
    assert results[0].history == [] and results[0].noise_multiplier == 0.0


def test_warmup_then_cosine_schedule():
    settings = OptimSettings(learning_rate=1.0, warmup_fraction=0.1)
    lrs = [learning_rate(settings, s, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(0.1, abs=0.01)
