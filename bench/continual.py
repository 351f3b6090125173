"""Continual-learning benchmark: naive / EWC / online EWC / joint on one task, each method in its own
`fedseek continual` process (so every arm pays the same start-up and wall times compare), seeded.

    python bench/continual.py --task banking77 --rounds 2
    python bench/continual.py --task pubmedqa --rounds 2 --extra "--batch-fraction 0.5"

Writes bench/results/continual-<task>.json and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_arm(task: str, method: str, args, out: Path) -> dict:
    command = [sys.executable, "-m", "fedseek", "continual", "--task", task, "--cl", method,
               "--rounds", str(args.rounds), "--local-steps", str(args.local_steps), "--seed", str(args.seed),
               "--ewc-lambda", str(args.ewc_lambda), "--out", str(out), *shlex.split(args.extra)]
    if args.no_dp:
        command.append("--no-dp")
    started = time.time()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    wall = time.time() - started
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"method": method, "command": " ".join(command[1:]), "process_wall_s": round(wall, 1), **report["cl"]}


def tune(task: str, args, out: Path) -> dict:
    """λ from the institutions' validation splits of the first two periods (never test data)."""
    command = [sys.executable, "-m", "fedseek", "continual", "--task", task, "--cl", "ewc", "--tune-only",
               "--tune-lambda", args.tune, "--rounds", str(args.rounds), "--local-steps", str(args.local_steps),
               "--seed", str(args.seed), "--out", str(out), *shlex.split(args.extra)]
    started = time.time()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise SystemExit(f"tuning failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    selection = json.loads((out / "report.json").read_text())["lambda_selection"]
    return {**selection, "command": " ".join(command[1:]), "process_wall_s": round(time.time() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="banking77")
    parser.add_argument("--methods", default="naive,ewc,online-ewc,joint")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=12)
    parser.add_argument("--ewc-lambda", type=float, default=1.0, help="used when --tune is empty")
    parser.add_argument("--tune", default="0.1,1,10", help="λ candidates chosen on validation splits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-dp", action="store_true")
    parser.add_argument("--extra", default="", help="further `fedseek continual` options")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-continual")
    args = parser.parse_args()
    selection = tune(args.task, args, args.out / args.task / "tune") if args.tune else None
    if selection:
        args.ewc_lambda = selection["chosen"]
        print(f"λ = {args.ewc_lambda:g} chosen on validation splits: {selection['validation_acc']}", flush=True)
    arms = []
    for method in args.methods.split(","):
        arms.append(run_arm(args.task, method, args, args.out / args.task / method))
        print(f"{method}: ACC {arms[-1]['acc']:.3f} wall {arms[-1]['process_wall_s']:.0f}s", flush=True)
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    tag = f"continual-{args.task}{'-nodp' if args.no_dp else ''}"
    (results / f"{tag}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                      "lambda_selection": selection, "arms": arms}, indent=2))
    naive = next((a for a in arms if a["method"] == "naive"), None)
    print("| method | λ | ACC | BWT | Forgetting | wall (s) | × naive | max ε |")
    print("|---|---|---|---|---|---|---|---|")
    for arm in arms:
        pct = lambda v: "—" if v is None else f"{100 * v:.1f}"  # noqa: E731
        ratio = f"{arm['process_wall_s'] / naive['process_wall_s']:.2f}" if naive else "—"
        eps = "—" if arm.get("epsilon_max") is None else f"{arm['epsilon_max']:.2f}"
        lam = "—" if arm["lambda"] is None else f"{arm['lambda']:g}"
        print(f"| {arm['method']} | {lam} | {pct(arm['acc'])} | {pct(arm['bwt'])} | {pct(arm['forgetting'])} "
              f"| {arm['process_wall_s']:.0f} | {ratio} | {eps} |")


if __name__ == "__main__":
    main()
