"""Model poisoning, in process: 5 banks on banking77 (10 intents, to stay fast), one of them
uploads global − 10 × its honest delta (scaled and sign-flipped). Plain FedAvg collapses; the
coordinate-wise trimmed mean and median, and FedAvg with norm-outlier rejection, stay within
2 points of the clean run. (At full size, 77 intents, only the outlier rejection does:
docs/reliability.md.) Same LocalTrainer
and the same robust aggregation code as the strategy; the full-size run is bench/robustness.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedseek.aggregator.robust import RobustAggregate, delta_norm, norm_outliers
from fedseek.clients.dp_trainer import LocalTrainer
from fedseek.config import LoraSettings, OptimSettings, PrivacySettings, RobustSettings
from fedseek.data.tasks import load_federated_data
from fedseek.models.classifier import AdapterClassifier
from fedseek.models.lora import load_trainable_state, trainable_state

INTENTS, SITES, ROUNDS, POISONED = 10, 5, 3, 4


@pytest.fixture(scope="module")
def federation():
    torch.set_num_threads(1)
    data = load_federated_data("banking77", institutions=SITES, seed=0)
    trainer = LocalTrainer(AdapterClassifier(None, INTENTS, LoraSettings()))
    keep = lambda rows: rows.subset(np.flatnonzero(rows.labels < INTENTS))  # noqa: E731
    sites = [keep(s) for s in data.train]
    sites = [trainer.classifier.encode(s.texts, s.labels) for s in sites]
    test = keep(data.test)
    test = trainer.classifier.encode(test.texts, test.labels)
    initial = {k: v.numpy().copy() for k, v in trainable_state(trainer.classifier.model).items()}
    return trainer, sites, test, initial


def run(federation, robust: RobustSettings, poisoned: int | None) -> float:
    trainer, sites, test, initial = federation
    optim, privacy = OptimSettings(local_steps=5, batch_fraction=0.25), PrivacySettings(enabled=False)
    global_state = {k: v.copy() for k, v in initial.items()}
    for rnd in range(1, ROUNDS + 1):
        aggregate, updates = RobustAggregate(robust), []
        for i, site in enumerate(sites):
            load_trainable_state(trainer.classifier.model, {k: torch.from_numpy(v.copy()) for k, v in global_state.items()})
            trainer.train_round(site, privacy, optim, rnd, ROUNDS, [], seed=i)
            update = {k: v.numpy().copy() for k, v in trainable_state(trainer.classifier.model).items()}
            if i == poisoned:
                update = {k: global_state[k] - 10.0 * (v - global_state[k]) for k, v in update.items()}
            updates.append((update, len(site)))
        norms = [delta_norm(u, global_state) for u, _ in updates]
        for (update, weight), outlier in zip(updates, norm_outliers(norms, robust.outlier_ratio)):
            if not outlier:  # as AdapterFedAvg does
                aggregate.add(update, weight)
        global_state = aggregate.result()
    load_trainable_state(trainer.classifier.model, {k: torch.from_numpy(v.copy()) for k, v in global_state.items()})
    return trainer.classifier.evaluate(test)["accuracy"]


def test_trimmed_mean_and_median_resist_one_poisoned_bank_of_five(federation):
    clean = run(federation, RobustSettings(), None)
    accuracy = {rule: run(federation, RobustSettings(rule=rule, trim_fraction=0.2), POISONED)
                for rule in ("fedavg", "trimmed-mean", "median")}
    accuracy["outlier"] = run(federation, RobustSettings(outlier_ratio=3.0), POISONED)
    print({"clean": clean, **accuracy})
    assert clean > 0.6, clean  # the clean job learns (chance: 0.1)
    assert accuracy["fedavg"] < clean - 0.2, accuracy  # unprotected: poisoned
    assert accuracy["trimmed-mean"] >= clean - 0.02, (clean, accuracy)
    assert accuracy["median"] >= clean - 0.02, (clean, accuracy)
    assert accuracy["outlier"] >= clean - 0.02, (clean, accuracy)  # FedAvg with norm-outlier rejection
