"""The federated job's arithmetic without Flower or Ray: the same LocalTrainer per institution and
the same pure FedAvg, in one process. Used to tune the DP recipe quickly and as the in-process
reference for federation-overhead measurements.

    python bench/inprocess_federation.py --rounds 5 --local-steps 12 [--no-dp] [--lora-layers 2]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from fedseek.aggregator.aggregation import weighted_average
from fedseek.clients.dp_trainer import LocalTrainer, OptimSettings, PrivacySettings
from fedseek.data.tasks import load_federated_data
from fedseek.models.classifier import AdapterClassifier
from fedseek.models.lora import LoraSettings, load_trainable_state, trainable_state


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="banking77")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=12)
    p.add_argument("--batch-fraction", type=float, default=0.125)
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--no-dp", action="store_true")
    p.add_argument("--lora-layers", type=int, default=1)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--targets", default="attention")
    p.add_argument("--ffa", action="store_true")
    p.add_argument("--schedule", default="cosine")
    p.add_argument("--base-model", default=None)
    p.add_argument("--institutions", type=int, default=3)
    args = p.parse_args()
    start = time.time()
    data = load_federated_data(args.task, institutions=args.institutions)
    lora = LoraSettings(rank=args.lora_rank, alpha=2.0 * args.lora_rank, targets=args.targets,
                        top_layers=args.lora_layers, ffa=args.ffa)
    server = AdapterClassifier(args.base_model, len(data.label_names), lora)
    trainer = LocalTrainer(AdapterClassifier(args.base_model, len(data.label_names), lora))
    test = server.encode(data.test.texts, data.test.labels)
    sites = [trainer.classifier.encode(s.texts, s.labels) for s in data.train]
    privacy = PrivacySettings(enabled=not args.no_dp, target_epsilon=args.epsilon, clip_norm=args.clip)
    optim = OptimSettings(local_steps=args.local_steps, batch_fraction=args.batch_fraction,
                          learning_rate=args.lr, schedule=args.schedule)
    global_state = trainable_state(server.model)
    histories = [[] for _ in sites]
    rows = []
    for rnd in range(1, args.rounds + 1):
        updates, results = [], []
        for i, site in enumerate(sites):
            load_trainable_state(trainer.classifier.model, global_state)
            r = trainer.train_round(site, privacy, optim, rnd, args.rounds, histories[i], seed=i)
            histories[i] = r.history
            results.append(r)
            updates.append({k: v.numpy() for k, v in trainable_state(trainer.classifier.model).items()})
        merged = weighted_average(updates, [len(s) for s in sites])
        global_state = {k: torch.from_numpy(v) for k, v in merged.items()}
        load_trainable_state(server.model, global_state)
        ev = server.evaluate(test)
        rows.append({"round": rnd, **ev, "epsilon": [round(r.epsilon, 3) for r in results],
                     "sigma": results[0].noise_multiplier, "s": round(time.time() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"final_accuracy": rows[-1]["accuracy"], "args": vars(args),
                      "wall_s": round(time.time() - start, 1)}))


if __name__ == "__main__":
    main()
