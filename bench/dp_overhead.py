"""DP overhead benchmark: time and peak memory of one training step, DP-SGD / non-DP, same model,
same batch, Opacus hooks mode (what the trainer uses) vs ghost clipping, at two model sizes
(the embedded 3.4M model and a random-init ~100M DeepSeek-V3 config), LoRA on the top layer
(the default: lower layers cached) and on every layer.

Times: the three variants run interleaved (non-DP, hooks, ghost, non-DP, ...) in one process so
that CPU contention hits all alike; medians. Memory: one fresh subprocess per variant, peak RSS
growth (Linux VmHWM, reset via /proc/self/clear_refs) over the loaded model and data during 3 steps.
LoRA targets: the MLA attention projections except `kv_b_proj`, on which Opacus 1.6 ghost clipping
fails (4-D input; the error is recorded); hooks and non-DP use the same targets for a fair ratio.

    python bench/dp_overhead.py [--reps 7] [--configs 0 1 2 3] [--reuse]
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench_io import RESULTS, pyplot, save_figure, write_json

TARGETS = "q_a_proj,q_b_proj,kv_a_proj_with_mqa,o_proj"
VARIANTS = ("non-DP", "DP hooks", "DP ghost")
LARGE_DIR = RESULTS.parent / ".cache" / "deepseek-v3-100m"
CONFIGS = [  # (name, top LoRA layers, batch)
    ("embedded 3.4M", 1, 256), ("embedded 3.4M", 0, 256), ("random ~100M", 1, 64), ("random ~100M", 0, 16)]


def base_dir(name: str) -> str | None:
    if name.startswith("embedded"):
        return None
    from large_model import save_large_checkpoint

    return str(save_large_checkpoint(LARGE_DIR))


class Stepper:
    """One model + optimizer for one variant; `step()` is one logical DP-SGD (or plain) step."""

    def __init__(self, variant: str, base: str | None, top_layers: int, batch: int, targets: str = TARGETS,
                 bf16: bool = False, checkpointing: bool = False):
        from opacus import GradSampleModule
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        from fedseek.data.tasks import load_federated_data
        from fedseek.models.classifier import AdapterClassifier
        from fedseek.config import LoraSettings

        site = load_federated_data("banking77").train[0]
        rows = np.random.default_rng(0).choice(len(site), batch, replace=False)
        self.clf = AdapterClassifier(base, 77, LoraSettings(targets=targets, top_layers=top_layers))
        self.data = self.clf.encode([site.texts[i] for i in rows], site.labels[rows])
        self.index = np.arange(batch)
        params = [p for p in self.clf.model.parameters() if p.requires_grad]
        adam = torch.optim.Adam(params, lr=1e-3)
        self.variant, self.loss = variant, nn.CrossEntropyLoss()
        dp = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch)
        if variant == "non-DP":
            self.optimizer = adam
        elif variant == "DP hooks":
            self.module = GradSampleModule(self.clf.model, batch_first=True, loss_reduction="mean")
            self.optimizer = DPOptimizer(adam, **dp)
        else:
            self.module = GradSampleModuleFastGradientClipping(
                self.clf.model, batch_first=True, loss_reduction="mean", max_grad_norm=1.0, use_ghost_clipping=True)
            self.optimizer = DPOptimizerFastGradientClipping(adam, **dp, loss_reduction="mean")
            self.loss = DPLossFastGradientClipping(self.module, self.optimizer, nn.CrossEntropyLoss(), "mean")
        if checkpointing:  # recompute each decoder layer's activations in the backward pass
            self.clf.model.base_model.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        self.bf16 = bf16
        self.clf.model.train()

    def step(self) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.clf.logits(self.data, self.index)
        loss = self.loss(logits.float(), self.data.labels[self.index])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def time_config(name: str, top_layers: int, batch: int, reps: int) -> dict:
    base = base_dir(name)
    steppers, errors = {}, {}
    for v in VARIANTS:
        try:
            steppers[v] = Stepper(v, base, top_layers, batch)
            steppers[v].step()  # warm-up (and fail early)
        except Exception as err:  # noqa: BLE001 - recorded in the results
            steppers.pop(v, None)
            errors[v] = f"{type(err).__name__}: {err}"[:300]
    times: dict[str, list[float]] = {v: [] for v in steppers}
    for _ in range(reps):
        for v, s in steppers.items():
            start = time.perf_counter()
            s.step()
            times[v].append(time.perf_counter() - start)
    median = {v: float(np.median(t)) for v, t in times.items()}
    row = {"model": name, "lora_layers": "top 1" if top_layers else "all", "batch": batch,
           "trainable_params": sum(p.numel() for p in next(iter(steppers.values())).clf.model.parameters()
                                   if p.requires_grad),
           "median_step_s": median, "step_s": times, "errors": errors,
           "ratio_vs_non_dp": {v: median[v] / median["non-DP"] for v in median if "non-DP" in median}}
    print(json.dumps({k: row[k] for k in ("model", "lora_layers", "median_step_s", "ratio_vs_non_dp", "errors")}),
          flush=True)
    del steppers
    gc.collect()
    return row


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def probe_memory(name: str, top_layers: int, batch: int, variant: str) -> dict:
    """Run in a fresh process: peak RSS growth over 3 steps above the loaded model and data."""
    stepper = Stepper(variant, base_dir(name), top_layers, batch)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_kib("VmRSS:")
    for _ in range(3):
        stepper.step()
    return {"step_peak_mib": (_rss_kib("VmHWM:") - before) / 1024, "process_peak_mib": _rss_kib("VmHWM:") / 1024}


def memory_config(index: int) -> dict:
    out = {}
    for v in VARIANTS:
        proc = subprocess.run([sys.executable, __file__, "--probe", str(index), v], capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        out[v] = json.loads(lines[-1]) if proc.returncode == 0 and lines else {"error": proc.stderr[-300:]}
    print(json.dumps(out), flush=True)
    return out


def ghost_on_default_targets() -> str:
    """Does ghost clipping work on the default preset (with `kv_b_proj`)?"""
    try:
        Stepper("DP ghost", None, 1, 32, targets="attention").step()
        return "works"
    except Exception as err:  # noqa: BLE001
        return f"fails: {type(err).__name__}: {err}"[:300]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--probe", nargs=2, metavar=("CONFIG", "VARIANT"))
    p.add_argument("--configs", type=int, nargs="+", default=list(range(len(CONFIGS))))
    p.add_argument("--reuse", action="store_true", help="keep the rows of the saved JSON, run only missing ones")
    a = p.parse_args()
    torch.manual_seed(0)
    if a.probe:
        print(json.dumps(probe_memory(*CONFIGS[int(a.probe[0])][:3], a.probe[1])))
        return
    saved = json.loads((RESULTS / "dp_overhead.json").read_text()) if a.reuse else {}
    state = {"command": f"python bench/dp_overhead.py --reps {a.reps}", "targets": TARGETS,
             "ghost_on_default_attention_preset": saved.get("ghost_on_default_attention_preset")
             or ghost_on_default_targets(), "device": "cpu", "gpu": "none available in this session",
             "rows": saved.get("rows", [])}
    for i in a.configs:
        name, top, batch = CONFIGS[i]
        done = [r for r in state["rows"] if (r["model"], r["lora_layers"], r["batch"])
                == (name, "top 1" if top else "all", batch)]
        if done:
            continue
        row = time_config(name, top, batch, a.reps)
        row["reps"] = a.reps
        row["memory"] = memory_config(i)
        state["rows"].append(row)
        write_json("dp_overhead", state)
    rows = state["rows"]
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['model']}\nLoRA {r['lora_layers']}, B={r['batch']}" for r in rows]
    for k, v in enumerate(VARIANTS[1:]):
        left.bar(np.arange(len(rows)) + 0.35 * k, [r["ratio_vs_non_dp"].get(v, 0) for r in rows], 0.35, label=v)
        right.bar(np.arange(len(rows)) + 0.35 * k,
                  [r["memory"][v].get("step_peak_mib", 0) / max(1e-9, r["memory"]["non-DP"].get("step_peak_mib", 1))
                   for r in rows], 0.35, label=v)
    left.axhline(1.05, color="k", ls="--", lw=0.8, label="goal 1.05x")
    left.set(ylabel="step time, DP / non-DP (median)", title="DP-SGD time overhead (CPU, 2 cores)")
    right.set(ylabel="step peak memory, DP / non-DP", title="DP-SGD memory overhead")
    for ax in (left, right):
        ax.set_xticks(np.arange(len(rows)) + 0.17, labels, fontsize=7)
        ax.legend(fontsize=8)
    save_figure(fig, "dp_overhead")


if __name__ == "__main__":
    main()
