"""Peak memory of one DP-SGD logical step of the causal-lm objective, per memory-saving setting:
adapted layers (the frozen-prefix cache keeps activations of the adapted layers only), physical
chunk size (Opacus virtual steps: the logical batch is the same), and the per-sample gradient
bytes Opacus materialises. Each setting runs in a fresh process (peak RSS of that process minus
its RSS before the step).

    python bench/generative_memory.py [--task pubmedqa-gen] [--records 256]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SETTINGS = [  # (adapted top layers: 0 = all, records per physical chunk)
    (0, 256), (0, 32), (1, 256), (1, 32)]


def one(task: str, records: int, layers: int, chunk: int) -> dict:
    import numpy as np
    import torch

    import bench_io  # noqa: F401 - one torch thread
    from fedseek.clients.dp_trainer import LocalTrainer
    from fedseek.clients.recipe import apply_generative_rule
    from fedseek.config import JobConfig
    from fedseek.data.plan import federated_data
    from fedseek.models.adapted import adapted_model, encode_rows

    job = JobConfig()
    job.data.task, job.lora.top_layers, job.lora.extra_trainable = task, layers, []
    apply_generative_rule(job)
    job.optim.chunk_size, job.optim.local_steps, job.optim.batch_fraction = chunk, 1, 1.0
    rows = federated_data(job).train[0]
    trainer = LocalTrainer(adapted_model(job, 1))
    data = encode_rows(trainer.classifier, rows.subset(np.arange(min(records, len(rows)))))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tick = time.perf_counter()
    job.privacy.noise_multiplier = 1.0
    trainer.train_round(data, job.privacy, job.optim, 1, 1, [], seed=0)  # one logical step over every record
    seconds = time.perf_counter() - tick
    trainer.private_module.enable_hooks()  # the per-sample gradients Opacus holds for one physical chunk
    trainer.classifier.loss(data, np.arange(min(chunk, len(data)))).backward()
    grad_sample_bytes = sum(p.grad_sample.numel() * p.grad_sample.element_size() for p in trainer.params)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tokens = int(sum(len(x) for x in data.inputs))
    return {"task": task, "records": len(data), "tokens": tokens, "adapted_layers": layers or "all", "chunk": chunk,
            "step_peak_mib": round((peak - before) / 1024, 1), "process_peak_mib": round(peak / 1024, 1),
            "trainable_params": sum(p.numel() for p in trainer.params), "seconds": round(seconds, 2),
            "grad_sample_mib_per_chunk": round(grad_sample_bytes / 2**20, 2),
            "torch": torch.__version__}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="pubmedqa-gen")
    p.add_argument("--records", type=int, default=256)
    p.add_argument("--one", default="")
    args = p.parse_args()
    if args.one:
        layers, chunk = (int(x) for x in args.one.split(","))
        print(json.dumps(one(args.task, args.records, layers, chunk)))
        return
    from bench_io import write_json

    results = []
    for layers, chunk in SETTINGS:
        out = subprocess.run([sys.executable, __file__, "--task", args.task, "--records", str(args.records),
                              "--one", f"{layers},{chunk}"], capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    write_json(f"generative_memory_{args.task}", {"results": results})


if __name__ == "__main__":
    main()
