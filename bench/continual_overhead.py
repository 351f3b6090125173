"""EWC's local cost beside naive fine-tuning, measured side by side in one process (interleaved, so
load from other processes hits both alike): a period of R DP rounds without EWC, vs the same rounds
with the EWC gradient hook plus the end-of-period DP Fisher pass.

    python bench/continual_overhead.py --rounds 2 --repeats 3

Writes bench/results/continual-overhead.json and continual-overhead.png.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench_io import pyplot, save_figure, write_json
from fedseek.clients.dp_trainer import LocalTrainer
from fedseek.config import FisherSettings, JobConfig, LoraSettings, OptimSettings, PrivacySettings
from fedseek.continual.ewc import EWCState
from fedseek.data.plan import job_data
from fedseek.models.classifier import AdapterClassifier
from fedseek.privacy.randomness import noise_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    job = JobConfig()
    job.data.periods, job.data.validation_fraction = "intent-groups", 0.1
    job.data.period = "labels 26-51"
    data = job_data(job)
    trainer = LocalTrainer(AdapterClassifier(None, len(data.label_names), LoraSettings()))
    site = trainer.classifier.encode(data.train[0].texts, data.train[0].labels, active_labels=data.active_labels)
    start = {n: p.detach().clone() for n, p in trainer.named_params.items()}
    state = EWCState([{n: torch.ones_like(p) for n, p in start.items()}], [start])
    privacy, optim, fisher = PrivacySettings(), OptimSettings(), FisherSettings()

    def period(with_ewc: bool) -> float:
        with torch.no_grad():
            for n, p in trainer.named_params.items():
                p.copy_(start[n])
        began, history = time.perf_counter(), []
        for server_round in range(1, args.rounds + 1):
            result = trainer.train_round(site, privacy, optim, server_round, args.rounds, history, seed=0,
                                         ewc=state if with_ewc else None, ewc_lambda=10.0,
                                         planned=[(fisher.noise_multiplier, fisher.sample_rate, 1)] if with_ewc else [])
            history = result.history
        if with_ewc:
            trainer.fisher(site, fisher, noise_source((0, 7)))
        return time.perf_counter() - began

    period(False)  # warm-up: noise planning cache, allocator
    period(True)
    naive, ewc = [], []
    for _ in range(args.repeats):
        naive.append(period(False))
        ewc.append(period(True))
    result = {"records": len(site), "rounds": args.rounds, "local_steps": optim.local_steps,
              "sample_rate": optim.batch_fraction, "fisher_rate": fisher.sample_rate, "threads": args.threads,
              "naive_s": naive, "ewc_s": ewc, "median_ratio": statistics.median(e / n for e, n in zip(ewc, naive))}
    result["command"] = f"python bench/continual_overhead.py --rounds {args.rounds} --repeats {args.repeats}"
    write_json("continual-overhead", result)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    xs = range(1, args.repeats + 1)
    ax.bar([x - 0.2 for x in xs], naive, width=0.4, color="tab:gray", label="naive period")
    ax.bar([x + 0.2 for x in xs], ewc, width=0.4, color="tab:blue", label="EWC hook + DP Fisher pass")
    ax.set(xlabel="repetition (interleaved)", ylabel="seconds", xticks=list(xs),
           title=f"one bank, {args.rounds} DP rounds x {optim.local_steps} steps: median {result['median_ratio']:.2f}x")
    ax.legend(fontsize=8)
    save_figure(fig, "continual-overhead")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
