"""Generative (causal-lm) DP-LoRA in one process: the same adapted model, LocalTrainer, private DP
noise and FedAvg as `fedseek simulate --task banking77-gen|pubmedqa-gen`, without Flower/Ray.

    python bench/generative.py --task banking77-gen --seeds 0,1,2 [--no-dp] [--lr 2e-2] [--validation]
    python bench/generative.py --task banking77-gen --base-only     # the base model, untrained

`--validation`: hold out 20 % of each institution's training records and score on them (tuning:
never the test set). Writes bench/results/<name>.json (per seed: rounds with perplexity, exact
match, ROUGE-L, wall seconds; and DP ÷ non-DP seconds per local step where both arms ran).
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

import bench_io  # noqa: F401 - one torch thread on the shared machine
from bench_io import write_json
from fedseek.aggregator.aggregation import StreamingAverage
from fedseek.clients.dp_trainer import LocalTrainer
from fedseek.clients.recipe import apply_generative_rule
from fedseek.config import JobConfig
from fedseek.data.partition import stratified_split
from fedseek.data.plan import federated_data
from fedseek.models.adapted import adapted_model, encode_rows
from fedseek.models.lora import load_trainable_state, trainable_state


def job_for(args, seed: int, dp: bool) -> JobConfig:
    job = JobConfig()
    job.data.task, job.data.max_test_rows, job.data.max_train_rows = args.task, args.test_rows, args.train_rows
    job.federation.rounds, job.federation.seed = args.rounds, seed
    job.lora.seed, job.lora.top_layers, job.lora.rank, job.lora.alpha = seed, args.lora_layers, args.rank, 2.0 * args.rank
    job.optim.learning_rate, job.optim.local_steps = args.learning_rate or 0.0, args.local_steps or 0
    job.optim.batch_fraction, job.privacy.clip_norm = args.batch_fraction, args.clip
    job.privacy.enabled = dp
    apply_generative_rule(job, {k for k in ("learning_rate", "local_steps") if getattr(args, k) is not None})
    return job


def run(args, seed: int, dp: bool) -> dict:
    job = job_for(args, seed, dp)
    data = federated_data(job)
    server = adapted_model(job, len(data.label_names))
    trainer = LocalTrainer(adapted_model(job, len(data.label_names)))
    sites, held = [], []
    for k, rows in enumerate(data.train):
        if args.validation:  # tuning: a hold-out of the institutions' own training records
            keep, hold = stratified_split(rows.labels, 0.2, seed + k)
            held.append(rows.subset(hold))
            rows = rows.subset(keep)
        sites.append(encode_rows(trainer.classifier, rows))
    scored = data.test if not args.validation else dataclasses.replace(
        held[0], texts=sum((h.texts for h in held), []), responses=sum((h.responses for h in held), []),
        labels=np.concatenate([h.labels for h in held]), lines=[], periods=None)
    if args.validation and args.test_rows:
        scored = scored.subset(np.sort(np.random.default_rng(seed).permutation(len(scored))[:args.test_rows]))
    test = encode_rows(server, scored)
    rows = [{"round": 0, **server.evaluate(test, generate=args.base_only or args.generate_every_round)}]
    print(rows[-1], flush=True)
    state = {k: v.numpy() for k, v in trainable_state(server.model).items()}
    histories, step_seconds, started = [[] for _ in sites], [], time.time()
    for rnd in range(1, 0 if args.base_only else args.rounds + 1):
        average = StreamingAverage()
        for i, site in enumerate(sites):
            load_trainable_state(trainer.classifier.model, {k: torch.from_numpy(v) for k, v in state.items()})
            tick = time.perf_counter()
            result = trainer.train_round(site, job.privacy, job.optim, rnd, job.federation.rounds, histories[i],
                                         seed * 7919 + i)
            step_seconds.append((time.perf_counter() - tick) / job.optim.local_steps)
            histories[i] = result.history
            average.add({k: v.numpy() for k, v in trainable_state(trainer.classifier.model).items()}, len(site))
        state = average.result()
        load_trainable_state(server.model, {k: torch.from_numpy(v) for k, v in state.items()})
        generate = args.generate_every_round or rnd == args.rounds  # greedy generation is the slow part
        rows.append({"round": rnd, **server.evaluate(test, generate=generate), "epsilon": result.epsilon if dp else None})
        print(rows[-1], flush=True)
    return {"seed": seed, "dp": dp, "rounds": rows, "samples": server.evaluation_samples(test, 5),
            "seconds_per_step": float(np.mean(step_seconds)) if step_seconds else None,
            "wall_s": round(time.time() - started, 1), "config": job.to_flat()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="banking77-gen")
    p.add_argument("--seeds", default="0")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=None, help="default: the generative rule's")
    p.add_argument("--batch-fraction", type=float, default=0.125)
    p.add_argument("--learning-rate", "--lr", type=float, default=None, help="default: the generative rule's")
    p.add_argument("--train-rows", type=int, default=0, help="a seeded subset of the training rows (0 = all)")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lora-layers", type=int, default=1)
    p.add_argument("--test-rows", type=int, default=0)
    p.add_argument("--no-dp", action="store_true")
    p.add_argument("--both", action="store_true", help="DP and non-DP arms, side by side")
    p.add_argument("--base-only", action="store_true")
    p.add_argument("--validation", action="store_true")
    p.add_argument("--generate-every-round", action="store_true", help="default: perplexity every round, "
                   "generation (exact match, ROUGE-L) at the base and after the last round")
    p.add_argument("--name", default="generative")
    args = p.parse_args()
    arms = [True, False] if args.both else [not args.no_dp and not args.base_only]
    results = [run(args, int(s), dp) for s in args.seeds.split(",") for dp in arms]
    summary = {}
    for dp in arms:
        finals = [r["rounds"][-1] for r in results if r["dp"] == dp]
        summary["dp" if dp else ("base" if args.base_only else "non_dp")] = {
            k: [float(np.mean([f[k] for f in finals])), float(np.std([f[k] for f in finals]))]
            for k in ("perplexity", "exact_match", "rouge_l")}
    if args.both:
        dp_s = np.mean([r["seconds_per_step"] for r in results if r["dp"]])
        summary["dp_over_non_dp_step_time"] = float(dp_s / np.mean([r["seconds_per_step"] for r in results if not r["dp"]]))
    print(summary)
    write_json(args.name, {"args": vars(args), "summary": summary, "runs": results})


if __name__ == "__main__":
    main()
