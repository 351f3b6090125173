"""The DP recipe of issue 16: the hyper-parameter rule, the linear-probe phase over cached
multi-layer features standardized with public statistics, LP-FT, one sigma plan shared by the
client and the ledger, and LoRA presets under DP either training or refused before training."""
from __future__ import annotations

import pytest
import torch

from fedseek.aggregator.reply_trust import train_plan
from fedseek.clients.dp_trainer import LocalTrainer
from fedseek.clients.recipe import Phase, apply_rule, probe_rule, round_phase
from fedseek.config import JobConfig, LoraSettings, OptimSettings, PrivacySettings, RecipeSettings
from fedseek.models.classifier import AdapterClassifier
from fedseek.models.features import ProbeHead, public_stats
from fedseek.models.lora import LoraTargetError, trainable_state
from fedseek.platform.store.ledger import planned_releases

PRIVATE = PrivacySettings(noise_multiplier=0.8, clip_norm=1.0, reproducible_noise=True)


@pytest.fixture(scope="module")
def site(banking):
    records = banking.train[0]
    return records.texts[:400], records.labels[:400]


def test_rule_gives_small_sites_larger_q_and_is_refused_for_nonsense():
    bank, hospital, huge = probe_rule(2334, 8.0, 5, 3), probe_rule(141, 8.0, 5, 3), probe_rule(10**6, 8.0, 5, 3)
    assert bank.sample_rate == pytest.approx(512 / 2334, abs=1e-4) and bank.local_steps == 44
    assert hospital.sample_rate == 0.5 > bank.sample_rate > huge.sample_rate == 0.2
    assert hospital.local_steps * 5 * hospital.sample_rate >= 48  # the rule's epochs, at least
    assert bank.probe_rounds == 5 and bank.learning_rate > 0 and bank.clip_norm == 1.0
    assert bank.max_length == 256  # whole abstracts; banking77 messages are shorter anyway
    assert bank.components == hospital.components == 256  # fewer lost on validation (recipe docstring)
    with pytest.raises(ValueError, match="epsilon"):
        probe_rule(100, 0.0, 5, 3)


def test_rule_keeps_what_the_user_set_and_the_lora_recipe_untouched():
    job = JobConfig(recipe=RecipeSettings(name="probe"))
    job.optim.local_steps = 7
    apply_rule(job, [2334, 900, 5000], given={"local_steps"})
    assert job.optim.local_steps == 7 and job.optim.batch_fraction == 0.5  # smallest site: 900 records
    old = JobConfig()
    apply_rule(old, [2334], given=set())
    assert (old.optim.batch_fraction, old.optim.local_steps, old.data.max_length) == (0.125, 12, 64)
    assert job.data.max_length == 256
    assert [round_phase(RecipeSettings("probe", 2), r, 4, 1e-3).kind for r in (1, 2, 3, 4)] == \
        ["probe", "probe", "lora", "lora"]
    assert round_phase(RecipeSettings("probe", 2), 3, 4, 1e-3) == Phase("lora", 1, 2, 1e-3)


@pytest.mark.parametrize("fisher", [False, True])
def test_client_ledger_and_coordinator_plan_the_same_sigma(fisher):
    """One sigma per job, whoever derives it; with a planned DP Fisher pass the ledger once
    calibrated without the reservation (a smaller sigma than the client trains with)."""
    job = JobConfig(recipe=RecipeSettings(name="probe"))
    apply_rule(job, [1200], given=set())
    if fisher:
        job.ewc.method, job.ewc.fisher_after = "ewc", True
    reserved = [(job.fisher.noise_multiplier, job.fisher.sample_rate, 1)] if job.ewc.uses_fisher else []
    client = LocalTrainer.plan_noise(None, job.privacy, job.optim, 1200, job.federation.rounds, [], reserved)
    releases, delta = planned_releases(job, 1200, "scope")
    coordinator = train_plan(job, 1200)
    assert {r.sigma for r in releases} == {client[0]} == {coordinator.sigma}
    assert releases[0].q == client[1] == coordinator.q and delta == client[2] == coordinator.delta
    assert len(releases) == job.federation.rounds and releases[0].steps == job.optim.local_steps


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_probe_round_trains_the_head_only_on_cached_public_standardized_features(site):
    trainer = LocalTrainer(AdapterClassifier(None, 77, LoraSettings(top_layers=1), 256, pooling="layers"))
    classifier = trainer.classifier
    data = classifier.encode(*site)
    head = next(m for m in classifier.model.modules() if isinstance(m, ProbeHead))
    mean, std, projection = public_stats(None, 256)  # the shipped statistics
    assert torch.equal(head.mean, mean) and torch.equal(head.projection, projection)  # public only
    assert not any(k.endswith(("mean", "std", "projection")) for k in trainable_state(classifier.model))
    features = classifier.probe_features(data)
    assert classifier.probe_features(data) is features and features.shape == (400, 5 * 256)
    before, loss_before = _snapshot(classifier.model), classifier.evaluate(data)["loss"]
    result = trainer.train_round(data, PRIVATE, OptimSettings(local_steps=10, batch_fraction=0.5), 1, 1, [], 0,
                                 phase=Phase("probe", 1, 1, 1e-2))
    after = dict(classifier.model.named_parameters())
    changed = {n for n, v in before.items() if not torch.equal(after[n], v)}
    assert changed and all("score" in n and "modules_to_save" in n for n in changed), changed
    assert classifier.evaluate(data)["loss"] < loss_before - 0.05
    assert classifier.probe_features(data) is features  # LoRA unchanged: no second forward pass
    small = AdapterClassifier(None, 77, LoraSettings(top_layers=1), 256, pooling="layers", components=32)
    small_head = next(m for m in small.model.modules() if isinstance(m, ProbeHead))
    assert small_head.linear.in_features == 32 and torch.equal(small_head.projection, projection[:, :32])
    assert result.history == [(0.8, 0.5, 10)]


def test_lp_ft_lora_round_after_the_probe_changes_lora_and_refreshes_features(site):
    trainer = LocalTrainer(AdapterClassifier(None, 77, LoraSettings(rank=4, top_layers=1), 256, pooling="layers"))
    classifier = trainer.classifier
    data = classifier.encode(*site)
    optim = OptimSettings(local_steps=3, batch_fraction=0.5)
    first = trainer.train_round(data, PRIVATE, optim, 1, 2, [], 0, phase=Phase("probe", 1, 1, 1e-2))
    frozen = {n: p.detach().clone() for n, p in classifier.model.named_parameters() if not p.requires_grad}
    old_features = classifier.probe_features(data)
    trainer.train_round(data, PRIVATE, optim, 2, 2, first.history, 0, phase=Phase("lora", 1, 1, 1e-2))
    params = dict(classifier.model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items()), "a frozen base weight changed"
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in params.items())
    assert not torch.equal(classifier.probe_features(data), old_features)


@pytest.mark.parametrize("targets,layers", [("attention", 1), ("attention", 0), ("attention+mlp", 1),
                                            ("attention+mlp", 0)])
def test_every_preset_under_dp_trains_or_is_refused_before_training(site, targets, layers):
    """The README's presets: a DP round either runs, or stops with LoraTargetError naming the
    reason before any record is sampled (it once crashed every client mid-round)."""
    trainer = LocalTrainer(AdapterClassifier(None, 77, LoraSettings(rank=4, targets=targets, top_layers=layers)))
    data = trainer.classifier.encode(site[0][:64], site[1][:64])
    before = _snapshot(trainer.classifier.model)
    try:
        result = trainer.train_round(data, PRIVATE, OptimSettings(local_steps=1, batch_fraction=0.5), 1, 1, [], 0)
    except LoraTargetError as refusal:
        assert "lora.targets" in str(refusal) and "attention" in str(refusal)
        assert all(torch.equal(p, before[n]) for n, p in trainer.classifier.model.named_parameters())
        assert targets == "attention+mlp"
    else:
        assert result.steps == 1 and not trainer.dp_unsupported


def test_cli_preflight_refuses_an_untrainable_preset_only_under_dp():
    from fedseek.platform.cli.main import _preflight

    job = JobConfig()
    job.lora = LoraSettings(targets="attention+mlp", top_layers=0)
    job.data.max_train_rows = 300
    with pytest.raises(LoraTargetError, match="--lora-targets attention"):
        _preflight(job)
    job.privacy.enabled = False
    assert _preflight(job) is job
