"""A small seeded 2-period run of one bank (banking77, intent groups, DP ε = 8 per period): EWC
forgets less than naive sequential fine-tuning, with margin. In-process trainer (the federated path
is exercised by test_continual.py)."""
from __future__ import annotations

import torch

from fedseek.clients.dp_trainer import LocalTrainer
from fedseek.config import EWCSettings, FisherSettings, JobConfig, LoraSettings, OptimSettings, PrivacySettings
from fedseek.continual.ewc import EWCState, consolidate, normalise_fisher
from fedseek.continual.fisher import restrict_rows
from fedseek.data.plan import job_data, period_names
from fedseek.models.classifier import AdapterClassifier
from fedseek.privacy.randomness import noise_source


def test_ewc_forgets_less_than_naive_under_dp():
    job = JobConfig()
    job.data.periods, job.data.period_groups = "intent-groups", 2
    names = period_names(job)
    periods = [job_data(job, name) for name in names]
    trainer = LocalTrainer(AdapterClassifier(None, 77, LoraSettings()))
    encode = lambda rows, p: trainer.classifier.encode(rows.texts, rows.labels, active_labels=p.active_labels)  # noqa: E731
    train = [encode(p.train[0], p) for p in periods]
    first_test = encode(periods[0].test, periods[0])
    privacy, optim, fisher = PrivacySettings(), OptimSettings(local_steps=12), FisherSettings()
    planned = [(fisher.noise_multiplier, fisher.sample_rate, 1)]

    def train_period(data, ewc=None, lam=0.0):
        history = []
        for server_round in (1, 2):
            result = trainer.train_round(data, privacy, optim, server_round, 2, history, seed=11,
                                         ewc=ewc, ewc_lambda=lam, planned=planned)
            history = result.history
        return history

    history = train_period(train[0])
    after_first = trainer.classifier.evaluate(first_test)["accuracy"]
    diagonal, entry = trainer.fisher(train[0], fisher, noise_source((11, 7)))
    assert len(history) == 2 and entry == planned[0]
    heads = [n for n in diagonal if "modules_to_save" in n]
    diagonal = restrict_rows(normalise_fisher(diagonal), heads, periods[0].active_labels)
    anchor = {n: p.detach().clone() for n, p in trainer.named_params.items()}
    state = consolidate(EWCState(), diagonal, anchor, EWCSettings(method="ewc", lam=10.0))

    forgetting = {}
    for method, lam in (("naive", 0.0), ("ewc", 10.0)):
        with torch.no_grad():
            for n, p in trainer.named_params.items():
                p.copy_(anchor[n])
        train_period(train[1], state if lam else None, lam)
        forgetting[method] = after_first - trainer.classifier.evaluate(first_test)["accuracy"]
    assert after_first > 0.1, after_first  # well above chance (1 in 39 labels)
    assert forgetting["naive"] > 0.03, forgetting
    assert forgetting["ewc"] < 0.5 * forgetting["naive"], forgetting
