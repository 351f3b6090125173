"""Training-recipe benchmark.

1. Learning-rate schedule: the default federated DP job (3 institutions, 5 rounds x 12 steps,
   eps = 8) with 5 % linear warmup + cosine decay (the default) vs 5 % warmup + constant vs
   constant without warmup, in process, same seeds.
2. Memory flags, LoRA on every layer (so activations of all layers are kept for the backward
   pass): fp32 vs bf16 autocast vs gradient checkpointing, without DP and with DP-SGD (Opacus
   hooks), on the embedded model (or `--memory-model 100m`: the ~100M random-init DeepSeek-V3).
   Peak RSS growth and median time of 3 steps in a fresh process per variant.

    python bench/recipe.py [--task medical_abstracts] [--seeds 0 1] [--memory-model embedded]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

from bench_io import pyplot, save_figure, write_json
from inprocess_federation import InProcessJob, run

SCHEDULES = {"warmup 5% + cosine (default)": dict(schedule="cosine", warmup=0.05),
             "warmup 5% + constant": dict(schedule="constant", warmup=0.05),
             "constant, no warmup": dict(schedule="constant", warmup=0.0)}
FLAGS = {"fp32": {}, "bf16 autocast": {"bf16": True}, "gradient checkpointing": {"checkpointing": True}}
MEMORY_BATCH = 32


def probe(flag: str, variant: str, model: str) -> dict:
    """In a fresh process: step memory and time of one variant (see dp_overhead.probe_memory)."""
    import gc
    from pathlib import Path

    from dp_overhead import LARGE_DIR, Stepper, _rss_kib
    from large_model import save_large_checkpoint

    base = str(save_large_checkpoint(LARGE_DIR)) if model == "100m" else None
    stepper = Stepper(variant, base, 0, MEMORY_BATCH, **FLAGS[flag])
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_kib("VmRSS:")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        stepper.step()
        times.append(time.perf_counter() - start)
    return {"step_peak_mib": (_rss_kib("VmHWM:") - before) / 1024, "median_step_s": float(np.median(times))}


def memory_flags(model: str) -> dict:
    out: dict[str, dict] = {}
    for flag in FLAGS:
        for variant in ("non-DP", "DP hooks"):
            proc = subprocess.run([sys.executable, __file__, "--probe", flag, variant, model], capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
            out[f"{flag} | {variant}"] = (json.loads(lines[-1]) if proc.returncode == 0 and lines
                                          else {"error": proc.stderr.strip().splitlines()[-1][:300]})
            print(f"{flag} | {variant}", out[f"{flag} | {variant}"], flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="medical_abstracts")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1], help="none: memory flags only")
    p.add_argument("--memory-model", choices=["embedded", "100m"], default="embedded")
    p.add_argument("--probe", nargs=3)
    a = p.parse_args()
    if a.probe:
        print(json.dumps(probe(*a.probe)))
        return
    memory = memory_flags(a.memory_model)
    schedules = []
    for seed in a.seeds:
        for name, settings in SCHEDULES.items():  # interleaved per seed
            result = run(InProcessJob(task=a.task, seed=seed, **settings), log=None)
            schedules.append({"schedule": name, "seed": seed, "final_accuracy": result["final_accuracy"],
                              "accuracy_per_round": [r["accuracy"] for r in result["rounds"]]})
            print(schedules[-1], flush=True)
    summary = {name: float(np.mean([s["final_accuracy"] for s in schedules if s["schedule"] == name]))
               for name in SCHEDULES if schedules}
    write_json("recipe", {"command": f"python bench/recipe.py --task {a.task} --seeds {' '.join(map(str, a.seeds))}"
                          f" --memory-model {a.memory_model}",
                          "schedules": schedules, "schedule_mean_accuracy": summary,
                          "memory_flags": memory, "memory_model": f"{a.memory_model}, LoRA on all layers",
                          "memory_batch": MEMORY_BATCH,
                          "bf16_note": "this CPU (AMD EPYC, AVX2) has no native bf16: autocast is emulated"})
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name in SCHEDULES if schedules else []:
        curves = np.array([s["accuracy_per_round"] for s in schedules if s["schedule"] == name])
        left.plot(range(1, curves.shape[1] + 1), 100 * curves.mean(0), "o-", label=name)
    left.set(xlabel="round", ylabel="test accuracy (%, mean of seeds)", title=f"{a.task}: LR schedule, DP eps=8")
    left.legend(fontsize=8)
    names = [k for k, v in memory.items() if "step_peak_mib" in v]
    right.barh(range(len(names)), [memory[k]["step_peak_mib"] for k in names])
    right.set_yticks(range(len(names)), names, fontsize=7)
    right.set(xlabel="peak memory of 3 steps above the loaded model (MiB)",
              title=f"{a.memory_model} model, LoRA all layers, batch {MEMORY_BATCH}")
    save_figure(fig, "recipe")


if __name__ == "__main__":
    main()
