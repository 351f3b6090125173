"""DP-SGD ÷ non-DP time of a causal-lm local step, interleaved in one process (DP and non-DP steps
alternate on the same records, so machine load hits both arms alike; the median ratio is reported).

    python bench/generative_overhead.py [--task banking77-gen] [--records 512] [--repeats 7]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import bench_io  # noqa: F401 - one torch thread
from bench_io import write_json
from fedseek.clients.dp_trainer import LocalTrainer
from fedseek.clients.recipe import apply_generative_rule
from fedseek.config import JobConfig, PrivacySettings
from fedseek.data.plan import federated_data
from fedseek.models.adapted import adapted_model, encode_rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="banking77-gen")
    p.add_argument("--records", type=int, default=512)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    job = JobConfig()
    job.data.task = args.task
    apply_generative_rule(job)
    job.optim.local_steps, job.optim.batch_fraction = 2, 0.25  # two logical steps of ~records/4 each
    rows = federated_data(job).train[0]
    trainer = LocalTrainer(adapted_model(job, 1))
    data = encode_rows(trainer.classifier, rows.subset(np.arange(min(args.records, len(rows)))))
    arms = {"dp": PrivacySettings(noise_multiplier=1.0), "non_dp": PrivacySettings(enabled=False)}
    times: dict[str, list[float]] = {name: [] for name in arms}
    for repeat in range(args.repeats):
        for name, privacy in arms.items():
            tick = time.perf_counter()
            trainer.train_round(data, privacy, job.optim, 1, 1, [], seed=repeat)
            times[name].append((time.perf_counter() - tick) / job.optim.local_steps)
    ratios = [d / n for d, n in zip(times["dp"], times["non_dp"])]
    result = {"task": args.task, "records": len(data), "expected_batch": job.optim.batch_fraction * len(data),
              "tokens_per_record": float(np.mean([len(x) for x in data.inputs])),
              "seconds_per_step": {k: float(np.median(v)) for k, v in times.items()},
              "dp_over_non_dp_median": float(np.median(ratios)), "ratios": ratios}
    print(result)
    write_json(f"generative_overhead_{args.task}", result)


if __name__ == "__main__":
    main()
