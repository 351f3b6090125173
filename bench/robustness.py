"""Model poisoning vs robust aggregation, in process (same LocalTrainer, same robust math as the
strategy, no Flower/Ray): 5 banks on banking77, one of them poisoned — it trains honestly, then
uploads global + factor x (its delta) (factor −10: scaled and sign-flipped). Compares the global
model's test accuracy after the job for: the clean run (no poisoning, FedAvg), and the poisoned
run under FedAvg, FedAvg + server clip, trimmed mean and median.

    python bench/robustness.py [--rounds 5 --local-steps 12 --dp]   -> bench/results/robustness.json
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import bench_io
from fedseek.aggregator.robust import RobustAggregate, clip_delta, delta_norm, norm_outliers
from fedseek.clients.dp_trainer import LocalTrainer
from fedseek.config import LoraSettings, OptimSettings, PrivacySettings, RobustSettings
from fedseek.data.tasks import load_federated_data
from fedseek.models.classifier import AdapterClassifier
from fedseek.models.lora import load_trainable_state, trainable_state


def setup(institutions: int = 5, seed: int = 0, test_rows: int | None = None, train_rows: int | None = None):
    data = load_federated_data("banking77", institutions=institutions, seed=seed, max_train_rows=train_rows)
    lora = LoraSettings(seed=seed)
    trainer = LocalTrainer(AdapterClassifier(None, len(data.label_names), lora))
    test = data.test if test_rows is None else data.test.subset(np.arange(len(data.test))[:test_rows])
    encoded_test = trainer.classifier.encode(test.texts, test.labels)
    sites = [trainer.classifier.encode(s.texts, s.labels) for s in data.train]
    initial = {k: v.numpy().copy() for k, v in trainable_state(trainer.classifier.model).items()}
    return trainer, sites, encoded_test, initial


def federate(trainer: LocalTrainer, sites, test, initial: dict, robust: RobustSettings, rounds: int,
             optim: OptimSettings, privacy: PrivacySettings, poisoned: int | None = None,
             factor: float = -10.0, seed: int = 0, log=None) -> dict:
    """Run the job; the site `poisoned` (if any) uploads global + factor x its honest delta."""
    start = time.time()
    global_state = {k: v.copy() for k, v in initial.items()}
    histories = {i: [] for i in range(len(sites))}
    accuracy, clipped = [], []
    rejected = []
    for rnd in range(1, rounds + 1):
        aggregate, updates = RobustAggregate(robust), []
        for i, site in enumerate(sites):
            load_trainable_state(trainer.classifier.model, {k: torch.from_numpy(v.copy()) for k, v in global_state.items()})
            result = trainer.train_round(site, privacy, optim, rnd, rounds, histories[i], seed=seed * 7919 + i)
            histories[i] = result.history
            update = {k: v.numpy().copy() for k, v in trainable_state(trainer.classifier.model).items()}
            if i == poisoned:
                update = {k: global_state[k] + factor * (v - global_state[k]) for k, v in update.items()}
            updates.append(update)
        norms = [delta_norm(u, global_state) for u in updates]
        outliers = norm_outliers(norms, robust.outlier_ratio)  # as AdapterFedAvg does
        for i, (update, outlier) in enumerate(zip(updates, outliers)):
            if outlier:
                rejected.append((rnd, i))
                continue
            if robust.clip_norm > 0:
                update, scale = clip_delta(update, global_state, robust.clip_norm)
                clipped.append((rnd, i, scale < 1.0, norms[i]))
            aggregate.add(update, len(sites[i]))
        if log:
            log(f"  round {rnd}: delta norms {[round(n, 3) for n in norms]}")
        global_state = aggregate.result()
        load_trainable_state(trainer.classifier.model, {k: torch.from_numpy(v.copy()) for k, v in global_state.items()})
        accuracy.append(trainer.classifier.evaluate(test)["accuracy"])
        if log:
            log(f"  round {rnd}: accuracy {accuracy[-1]:.4f} ({time.time() - start:.0f}s)")
    return {"accuracy": accuracy[-1], "accuracy_per_round": accuracy, "wall_s": round(time.time() - start, 1),
            "clipped_poisoned": sum(1 for _, i, c, _ in clipped if c and i == poisoned),
            "clipped_honest": sum(1 for _, i, c, _ in clipped if c and i != poisoned),
            "rejected": [{"round": r, "site": i} for r, i in rejected]}


ARMS = {  # name: (robust settings, poisoned site)
    "clean fedavg": (RobustSettings(), None),
    "poisoned fedavg": (RobustSettings(), 4),
    "poisoned trimmed-mean 0.2": (RobustSettings(rule="trimmed-mean", trim_fraction=0.2), 4),
    "poisoned median": (RobustSettings(rule="median"), 4),
}
CLEAN_ROBUST = {  # --all: what the robust rules cost without an attack
    "clean trimmed-mean 0.2": (RobustSettings(rule="trimmed-mean", trim_fraction=0.2), None),
    "clean median": (RobustSettings(rule="median"), None),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=12)
    p.add_argument("--dp", action="store_true", help="DP-SGD at epsilon 8 (default: no DP, faster)")
    p.add_argument("--factor", type=float, default=-10.0)
    p.add_argument("--clip", type=float, default=0.0, help="add a 'poisoned fedavg + server clip' arm")
    p.add_argument("--test-rows", type=int, default=None)
    p.add_argument("--all", action="store_true", help="also the robust rules on the clean run")
    p.add_argument("--outlier-ratio", type=float, default=0.0, help="add a 'fedavg + norm-outlier rejection' arm")
    p.add_argument("--only", nargs="*", default=None, help="run only these arm names")
    p.add_argument("--append", action="store_true", help="keep other arms' rows already in the results file")
    p.add_argument("--name", default="robustness", help="results file bench/results/NAME.json")
    a = p.parse_args()
    trainer, sites, test, initial = setup(test_rows=a.test_rows)
    privacy = PrivacySettings(enabled=a.dp, target_epsilon=8.0)
    optim = OptimSettings(local_steps=a.local_steps)
    arms = {**ARMS, **(CLEAN_ROBUST if a.all else {})}
    if a.clip:
        arms[f"poisoned fedavg + server clip {a.clip:g}"] = (RobustSettings(clip_norm=a.clip), 4)
    arms["clean fedavg, 4 banks (bank 5 left out)"] = (RobustSettings(), "drop")  # the ceiling of rejecting it
    if a.outlier_ratio:
        arms[f"poisoned fedavg + outlier rejection {a.outlier_ratio:g}"] = (RobustSettings(outlier_ratio=a.outlier_ratio), 4)
    if a.only is not None:
        arms = {k: v for k, v in arms.items() if k in a.only}
    rows = []
    if a.append and (bench_io.RESULTS / f"{a.name}.json").exists():
        rows = [r for r in json.loads((bench_io.RESULTS / f"{a.name}.json").read_text())["rows"] if r["arm"] not in arms]
    for name, (robust, poisoned) in arms.items():
        print(name, flush=True)
        used = sites[:4] if poisoned == "drop" else sites
        row = federate(trainer, used, test, initial, robust, a.rounds, optim, privacy,
                       None if poisoned == "drop" else poisoned, a.factor, log=print)
        rows.append({"arm": name, "rule": robust.rule, "trim_fraction": robust.trim_fraction,
                     "clip_norm": robust.clip_norm, "poisoned_site": poisoned, **row})
        print(json.dumps(rows[-1]), flush=True)
        bench_io.write_json(a.name, {"command": "python bench/robustness.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()), "args": vars(a),
            "institutions": 5, "train_rows": [len(s) for s in sites], "test_rows": len(test), "rows": rows})
    clean = next(r["accuracy"] for r in rows if r["arm"] == "clean fedavg")
    for r in rows:
        print(f"{r['arm']:40s} {r['accuracy']:.4f} ({100 * (r['accuracy'] - clean):+.1f} points vs clean)")


if __name__ == "__main__":
    main()
