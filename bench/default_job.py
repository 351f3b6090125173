"""The README's default job, `fedseek simulate`, with and without DP: final and per-round accuracy,
ε per institution, σ, bytes uploaded, whole-process wall time and the driver's peak memory.
Each run is tracked as a user's job is, into a platform home of its own (never this machine's
ledger), in its own process, seeded.

    python bench/default_job.py [--seeds 0 1]     (--plot-only re-plots the saved JSON)

Writes bench/results/default_job.json and default_job.png (accuracy per round, DP vs non-DP).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_io import RESULTS, own_platform_env, pyplot, save_figure, write_json

ROOT = Path(__file__).resolve().parents[1]


def simulate(out: Path, seed: int, dp: bool) -> dict:
    shown = ["simulate", "--seed", str(seed)] + ([] if dp else ["--no-dp"])
    command = [sys.executable, "-m", "fedseek", *shown, "--out", str(out / "job")]
    started = time.time()
    with (out / "stdout.log").open("w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=own_platform_env(out / "home"), stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # the driver's own peak RSS (KiB on Linux)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{(out / 'stdout.log').read_text()[-3000:]}")
    report = json.loads((out / "job" / "report.json").read_text())
    return {"command": "fedseek " + " ".join(shown), "seed": seed, "dp": dp,
            "final_accuracy": report["final_accuracy"],
            "accuracy_per_round": [r["accuracy"] for r in report["rounds"]],
            "epsilon": report.get("epsilon"), "noise_multiplier": report.get("noise_multiplier"),
            "bytes_up_per_round": report.get("bytes_up_per_round"),
            "process_wall_s": round(wall, 1), "driver_peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def plot(runs: list[dict]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for run in runs:
        rounds = range(1, len(run["accuracy_per_round"]) + 1)
        label = f"{'DP eps=8' if run['dp'] else 'non-DP'}, seed {run['seed']}: {100 * run['final_accuracy']:.1f} %"
        ax.plot(rounds, [100 * a for a in run["accuracy_per_round"]], marker="o",
                color="tab:blue" if run["dp"] else "tab:gray", ls="-" if run["seed"] == runs[0]["seed"] else "--",
                label=label)
    ax.set(xlabel="round", ylabel="global test accuracy (%)", xticks=list(rounds),
           title="fedseek simulate: 3 banks, banking77, embedded base")
    ax.legend(fontsize=8)
    save_figure(fig, "default_job")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--plot-only", action="store_true", help="re-plot bench/results/default_job.json")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads((RESULTS / "default_job.json").read_text())["runs"])
        return
    runs = []
    with tempfile.TemporaryDirectory(prefix="fedseek-bench-default-") as tmp:
        for seed in args.seeds:
            for dp in (True, False):
                out = Path(tmp) / f"seed{seed}-{'dp' if dp else 'nodp'}"
                out.mkdir()
                runs.append(simulate(out, seed, dp))
                print(json.dumps(runs[-1]), flush=True)
    dp_runs = {r["seed"]: r for r in runs if r["dp"]}
    ratios = {s: r["final_accuracy"] / next(x for x in runs if x["seed"] == s and not x["dp"])["final_accuracy"]
              for s, r in dp_runs.items()}
    write_json("default_job", {"command": "python bench/default_job.py --seeds " + " ".join(map(str, args.seeds)),
                               "runs": runs, "dp_over_nondp_accuracy": ratios})
    plot(runs)


if __name__ == "__main__":
    main()
