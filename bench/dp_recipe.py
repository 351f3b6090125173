"""The DP recipe of issue 16 (`--recipe probe`, the `fedseek simulate` default) measured as a user
runs it: each (task, partition, seed, DP on/off) is one `fedseek simulate` process, tracked into a
platform home of its own, private DP noise (never --reproducible-noise). Appends one row per run to
bench/results/dp_recipe.json (final accuracy, epsilon, sigma, q, steps, wall time).

    python bench/dp_recipe.py --task banking77 --seeds 0 1 2 [--no-dp] [--partition dirichlet --alpha 0.3]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_io import RESULTS, machine, own_platform_env

ROOT = Path(__file__).resolve().parents[1]


def run(task: str, seed: int, dp: bool, extra: list[str]) -> dict:
    shown = ["simulate", "--task", task, "--seed", str(seed), *extra] + ([] if dp else ["--no-dp"])
    with tempfile.TemporaryDirectory(prefix="fedseek-dp-recipe-") as tmp:
        out = Path(tmp)
        started = time.time()
        done = subprocess.run([sys.executable, "-m", "fedseek", *shown, "--out", str(out / "job")], cwd=ROOT,
                              env=own_platform_env(out / "home"), capture_output=True, text=True)
        wall = time.time() - started
        if done.returncode:
            raise SystemExit(f"fedseek {' '.join(shown)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        report = json.loads((out / "job" / "report.json").read_text())
    keys = ("final_accuracy", "initial_accuracy", "epsilon", "dp_noise", "noise_multiplier", "sampling_rate",
            "steps", "clip_norm", "train_examples", "wall_seconds")
    return {"command": "fedseek " + " ".join(shown), "task": task, "seed": seed, "dp": dp,
            **{k: report.get(k) for k in keys}, "process_wall_s": round(wall, 1), "date": time.strftime("%Y-%m-%d")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="banking77")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-dp", action="store_true")
    args, extra = parser.parse_known_args()
    path = RESULTS / "dp_recipe.json"
    for seed in args.seeds:
        row = run(args.task, seed, not args.no_dp, extra)
        print(json.dumps(row), flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        rows = json.loads(path.read_text())["rows"] if path.is_file() else []
        path.write_text(json.dumps({"rows": rows + [row], "machine": machine()}, indent=2))


if __name__ == "__main__":
    main()
