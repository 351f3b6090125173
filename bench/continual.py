"""Continual-learning benchmark: naive / EWC / online EWC / joint on one task, each method in its own
`fedseek continual` process (so every arm pays the same start-up and wall times compare), seeded.

    python bench/continual.py --task banking77 --rounds 2
    python bench/continual.py --task pubmedqa --rounds 2 --extra "--batch-fraction 0.5"

Writes bench/results/continual-<task>.json (numbers, machine, date, whole-benchmark wall time),
bench/results/continual-<task>.png (ACC / BWT / Forgetting and wall time per method), each arm's
accuracy-matrix heat-map as continual-<task>-<method>.png, and a markdown
table on stdout; `--plot-only` re-plots the saved JSON.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_io import RESULTS, own_platform_env, pyplot, save_figure, write_json

ROOT = Path(__file__).resolve().parents[1]


def run_arm(task: str, method: str, args, out: Path) -> dict:
    command = [sys.executable, "-m", "fedseek", "continual", "--task", task, "--cl", method,
               "--rounds", str(args.rounds), "--local-steps", str(args.local_steps), "--seed", str(args.seed),
               "--ewc-lambda", str(args.ewc_lambda), "--out", str(out), *shlex.split(args.extra)]
    if args.no_dp:
        command.append("--no-dp")
    started = time.time()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=own_platform_env(out / "home"))
    wall = time.time() - started
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    if (out / "cl_heatmap.png").is_file():  # the arm's accuracy matrix, beside the summary plot
        RESULTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "cl_heatmap.png", RESULTS / f"continual-{task}-{method}.png")
    return {"method": method, "command": " ".join(command[1:]), "process_wall_s": round(wall, 1), **report["cl"]}


def tune(task: str, args, out: Path) -> dict:
    """λ from the institutions' validation splits of the first two periods (never test data)."""
    command = [sys.executable, "-m", "fedseek", "continual", "--task", task, "--cl", "ewc", "--tune-only",
               "--tune-lambda", args.tune, "--rounds", str(args.rounds), "--local-steps", str(args.local_steps),
               "--seed", str(args.seed), "--out", str(out), *shlex.split(args.extra)]
    started = time.time()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=own_platform_env(out / "home"))
    if proc.returncode != 0:
        raise SystemExit(f"tuning failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    selection = json.loads((out / "report.json").read_text())["lambda_selection"]
    return {**selection, "command": " ".join(command[1:]), "process_wall_s": round(time.time() - started, 1)}


def plot(saved: dict, tag: str) -> None:
    """Left: ACC / BWT / Forgetting per method (points); right: each arm's process wall time."""
    arms, plt = saved["arms"], pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    names = [a["method"] for a in arms]
    for offset, (key, color) in enumerate([("acc", "tab:blue"), ("bwt", "tab:red"), ("forgetting", "tab:orange")]):
        values = [100 * a[key] if a.get(key) is not None else 0.0 for a in arms]
        xs = [i + (offset - 1) * 0.27 for i in range(len(arms))]
        left.bar(xs, values, width=0.27, color=color, label=key.upper() if key != "forgetting" else "Forgetting")
        for x, a, v in zip(xs, arms, values):
            left.text(x, v + (0.5 if v >= 0 else -2.5), "—" if a.get(key) is None else f"{v:.1f}",
                      ha="center", fontsize=7)
    left.axhline(0, color="k", lw=0.6)
    left.margins(y=0.12)
    left.set_xticks(range(len(arms)), names)
    left.set(ylabel="points (%)", title=f"{saved['args']['task']}: continual learning, DP per period")
    left.legend(fontsize=8)
    right.barh(names, [a["process_wall_s"] for a in arms], color="tab:gray")
    right.invert_yaxis()
    total = saved.get("total_wall_s")
    right.set(xlabel="process wall (s)", title=f"whole benchmark {total / 60:.1f} min" if total else "wall time")
    save_figure(fig, tag)


def table(arms: list[dict]) -> None:
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
    parser.add_argument("--plot-only", action="store_true", help="re-plot the saved JSON")
    args = parser.parse_args()
    tag = f"continual-{args.task}{'-nodp' if args.no_dp else ''}"
    if args.plot_only:
        saved = json.loads((RESULTS / f"{tag}.json").read_text())
        plot(saved, tag)
        table(saved["arms"])
        return
    started = time.time()
    selection = tune(args.task, args, args.out / args.task / "tune") if args.tune else None
    if selection:
        args.ewc_lambda = selection["chosen"]
        print(f"λ = {args.ewc_lambda:g} chosen on validation splits: {selection['validation_acc']}", flush=True)
    arms = []
    for method in args.methods.split(","):
        arms.append(run_arm(args.task, method, args, args.out / args.task / method))
        print(f"{method}: ACC {arms[-1]['acc']:.3f} wall {arms[-1]['process_wall_s']:.0f}s", flush=True)
    saved = {"command": "python bench/continual.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
             "args": {k: str(v) for k, v in vars(args).items()}, "lambda_selection": selection, "arms": arms,
             "total_wall_s": round(time.time() - started, 1)}
    write_json(tag, saved)
    plot(saved, tag)
    table(arms)


if __name__ == "__main__":
    main()
