"""The federated job's arithmetic without Flower or Ray: the same LocalTrainer per institution, the
same update compression and the same streaming FedAvg, in one process. Used to tune the DP recipe
quickly, by the utility and communication benchmarks, and as the in-process reference for
federation-overhead measurements. `sites` restricts training to some institutions (one site =
that institution alone: the local-only baseline); `institutions=1` pools every record (centralized).

    python bench/inprocess_federation.py --rounds 5 --local-steps 12 [--no-dp] [--lora-layers 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass, field

import torch

import bench_io  # noqa: F401 - one torch thread on the shared machine
from fedseek.aggregator.aggregation import StreamingAverage
from fedseek.clients.dp_trainer import LocalTrainer
from fedseek.config import CompressionSettings, LoraSettings, OptimSettings, PrivacySettings
from fedseek.data.tasks import load_federated_data
from fedseek.models.classifier import AdapterClassifier
from fedseek.models.lora import load_trainable_state, trainable_state
from fedseek.wire.compression import apply_delta, compress, decode, delta_between, payload_bytes


@dataclass
class InProcessJob:
    task: str = "banking77"
    institutions: int = 3
    partition: str = "iid"
    alpha: float = 0.5
    rounds: int = 5
    local_steps: int = 12
    batch_fraction: float = 0.125
    lr: float = 2e-2
    clip: float = 1.0
    epsilon: float = 8.0
    dp: bool = True
    lora_layers: int = 1
    lora_rank: int = 16
    targets: str = "attention"
    ffa: bool = False
    schedule: str = "cosine"
    warmup: float = 0.05
    base_model: str | None = None
    seed: int = 0
    sites: list[int] | None = None  # train only these institutions (None = all)
    compression: CompressionSettings = field(default_factory=CompressionSettings)


_cache: dict[tuple, tuple] = {}


def _setup(job: InProcessJob):
    """Data, server model and trainer, reused across jobs with the same data/model settings."""
    key = (job.task, job.institutions, job.partition, job.alpha, job.seed, job.lora_layers,
           job.lora_rank, job.targets, job.ffa, job.base_model)
    if key not in _cache:
        _cache.clear()
        data = load_federated_data(job.task, institutions=job.institutions, partition_scheme=job.partition,
                                   alpha=job.alpha, seed=job.seed)
        lora = LoraSettings(rank=job.lora_rank, alpha=2.0 * job.lora_rank, targets=job.targets,
                            top_layers=job.lora_layers, ffa=job.ffa, seed=job.seed)
        server = AdapterClassifier(job.base_model, len(data.label_names), lora)
        trainer = LocalTrainer(AdapterClassifier(job.base_model, len(data.label_names), lora))
        test = server.encode(data.test.texts, data.test.labels)
        sites = [trainer.classifier.encode(s.texts, s.labels) for s in data.train]
        _cache[key] = (data, server, trainer, test, sites, trainable_state(server.model))
    return _cache[key]


def run(job: InProcessJob, log=print) -> dict:
    """Train `job`; returns per-round accuracy, epsilon, bytes uploaded and wall time."""
    start = time.time()
    data, server, trainer, test, sites, initial = _setup(job)
    chosen = job.sites if job.sites is not None else list(range(len(sites)))
    privacy = PrivacySettings(enabled=job.dp, target_epsilon=job.epsilon, clip_norm=job.clip)
    optim = OptimSettings(local_steps=job.local_steps, batch_fraction=job.batch_fraction,
                          learning_rate=job.lr, schedule=job.schedule, warmup_fraction=job.warmup)
    global_state = {k: v.numpy().copy() for k, v in initial.items()}
    histories: dict[int, list] = {i: [] for i in chosen}
    residuals: dict[int, dict | None] = {i: None for i in chosen}
    rows = []
    for rnd in range(1, job.rounds + 1):
        average, results, sent_bytes = StreamingAverage(), [], 0
        for i in chosen:
            load_trainable_state(trainer.classifier.model, {k: torch.from_numpy(v) for k, v in global_state.items()})
            r = trainer.train_round(sites[i], privacy, optim, rnd, job.rounds, histories[i], seed=job.seed * 7919 + i)
            histories[i] = r.history
            results.append(r)
            trained = {k: v.numpy() for k, v in trainable_state(trainer.classifier.model).items()}
            if job.compression.enabled:  # exactly what client_app.upload and the strategy do
                payload, residuals[i] = compress(delta_between(trained, global_state), job.compression, residuals[i])
                average.add(decode(payload, global_state), len(sites[i]))
            else:
                payload = trained
                average.add(trained, len(sites[i]))
            sent_bytes += payload_bytes(payload)
        merged = average.result()
        global_state = apply_delta(global_state, merged) if job.compression.enabled else merged
        load_trainable_state(server.model, {k: torch.from_numpy(v) for k, v in global_state.items()})
        ev = server.evaluate(test)
        rows.append({"round": rnd, **ev, "bytes_up": sent_bytes,
                     "epsilon": [round(r.epsilon, 3) for r in results] if job.dp else None,
                     "sigma": results[0].noise_multiplier, "elapsed_s": round(time.time() - start, 1)})
        if log:
            log(json.dumps(rows[-1]), flush=True)
    return {"final_accuracy": rows[-1]["accuracy"], "rounds": rows, "wall_s": round(time.time() - start, 1),
            "adapter_params": int(sum(v.size for v in global_state.values())),
            "train_rows": [len(sites[i]) for i in chosen], "job": _jsonable(job)}


def _jsonable(job: InProcessJob) -> dict:
    return dataclasses.asdict(job)


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
    p.add_argument("--partition", default="iid", choices=["iid", "dirichlet"])
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--compression", default="none")
    p.add_argument("--topk", type=float, default=0.0)
    a = p.parse_args()
    job = InProcessJob(task=a.task, rounds=a.rounds, local_steps=a.local_steps, batch_fraction=a.batch_fraction,
                       lr=a.lr, clip=a.clip, epsilon=a.epsilon, dp=not a.no_dp, lora_layers=a.lora_layers,
                       lora_rank=a.lora_rank, targets=a.targets, ffa=a.ffa, schedule=a.schedule,
                       base_model=a.base_model, institutions=a.institutions, partition=a.partition, alpha=a.alpha,
                       compression=CompressionSettings(codec=a.compression, topk=a.topk))
    result = run(job)
    print(json.dumps({"final_accuracy": result["final_accuracy"], "args": vars(a), "wall_s": result["wall_s"]}))


if __name__ == "__main__":
    main()
