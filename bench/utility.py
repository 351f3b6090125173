"""Utility benchmark: what privacy costs and what federation gains, on one task.

Three institutions with Dirichlet(0.3) label skew; the default recipe (embedded base, LoRA r=16 on
the top layer's attention + head, 5 rounds x 12 steps, q = 0.125, C = 1, lr 2e-2) for every row:
  centralized   all institutions' records pooled in one place (same number of steps)
  federated     FedAvg over the three institutions, non-private and DP at eps in {1, 3, 8}
  FFA-LoRA      federated DP eps = 8 with A frozen (only B + head trained and averaged)
  local-only    each institution alone with DP eps = 8, accuracy averaged over institutions
All rows run in process with the pipeline's trainer and aggregation (`inprocess_federation.py`)
and are evaluated on the task's global test set. Beside them, the baselines of `baselines.py` on the
same partition (majority class; TF-IDF + logistic regression one institution / pooled, non-DP; DP
linear on hashed n-grams at eps = 8, one institution / pooled), mean of `--baseline-seeds` split
seeds; the plot draws them as vertical reference lines. Baselines need the `bench` extra
(`pip install -e .[bench]`, scikit-learn).

With `--nondp-lr LR` the non-DP rows also run at LR (without clipping, lr 2e-2 is unstable on
medical_abstracts) and the goals use the better centralized non-DP row.

    python bench/utility.py --task banking77
    python bench/utility.py --task medical_abstracts
    python bench/utility.py --task banking77 --baselines-only   # (re)compute only the baseline rows
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from baselines import reference_lines, run_seed, table_rows
from bench_io import pyplot, save_figure, write_json
from inprocess_federation import InProcessJob, run


def baseline_rows(task: str, alpha: float, seeds: int) -> list[dict]:
    """The baselines on this table's partition (3 institutions, Dirichlet(alpha)), split seeds 0..seeds-1."""
    return table_rows([run_seed(task, s, "dirichlet", alpha) for s in range(seeds)])


def plot(rows: list[dict], task: str, alpha: float, name: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(12, 4.8))
    baselines, rows = [r for r in rows if r.get("baseline")], [r for r in rows if not r.get("baseline")]
    colors = ["tab:gray" if "centralized" in r["setting"] else "tab:orange" if "local" in r["setting"]
              else "tab:blue" for r in rows]
    ax.barh(range(len(rows)), [100 * r["accuracy"] for r in rows], color=colors)
    for i, r in enumerate(rows):
        ax.text(100 * r["accuracy"] + 0.5, i, f"{100 * r['accuracy']:.1f}", va="center", fontsize=8)
    central = max((r["accuracy"] for r in rows if r["setting"].startswith("centralized non-DP")), default=None)
    if central:
        ax.axvline(90 * central, color="k", ls="--", lw=0.8, label="90 % of the best centralized non-DP")
    reference_lines(ax, baselines)
    if central or baselines:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_yticks(range(len(rows)), [r["setting"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="test accuracy (%)", title=f"{task}: 3 institutions, Dirichlet alpha={alpha:g}")
    save_figure(fig, name)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="banking77")
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nondp-lr", type=float, default=None,
                   help="also run the non-DP rows at this learning rate (without clipping the default 2e-2 "
                        "can be unstable); the goals then use the better centralized non-DP row")
    p.add_argument("--only", nargs="+", help="run only these settings (by name), e.g. under a time limit")
    p.add_argument("--plot-only", action="store_true", help="re-plot the saved JSON (e.g. of an interrupted run)")
    p.add_argument("--baseline-seeds", type=int, default=3, help="split seeds the baseline rows average over")
    p.add_argument("--baselines-only", action="store_true",
                   help="(re)compute only the baseline rows; the saved FedSeek rows are kept")
    a = p.parse_args()
    if a.plot_only:
        from bench_io import RESULTS

        saved = json.loads((RESULTS / f"utility_{a.task}.json").read_text())
        plot(saved["rows"], a.task, a.alpha, f"utility_{a.task}")
        return
    common = dict(task=a.task, partition="dirichlet", alpha=a.alpha, rounds=a.rounds,
                  local_steps=a.local_steps, seed=a.seed)
    name = f"utility_{a.task}"
    saved_path = Path(__file__).parent / "results" / f"{name}.json"
    # --only adds/replaces those settings; the other rows of the saved JSON are kept
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else {"rows": []}
    rows = ([r for r in saved["rows"] if r["setting"] not in a.only] if a.only
            else [r for r in saved["rows"] if not r.get("baseline")] if a.baselines_only else [])

    def record(name: str, dp: bool, epsilon: float | None, results: list[dict]) -> None:
        acc = [r["final_accuracy"] for r in results]
        rows.append({"setting": name, "dp": dp, "epsilon": epsilon, "accuracy": float(np.mean(acc)),
                     "per_institution": acc if len(acc) > 1 else None,
                     "accuracy_per_round": [r["accuracy"] for r in results[0]["rounds"]],
                     "train_rows": [n for r in results for n in r["train_rows"]],
                     "wall_s": float(sum(r["wall_s"] for r in results))})
        print(rows[-1], flush=True)

    def save(goals=None) -> None:  # after every row: an interrupted run still leaves its rows
        only = " --only " + " ".join(f'"{o}"' for o in a.only) if a.only else ""
        command = f"python bench/utility.py --task {a.task}{only}" + (" --baselines-only" if a.baselines_only else "")
        write_json(name, {"command": command, "args": vars(a), "rows": rows,
                          "goals": saved.get("goals") if a.baselines_only else goals,
                          "complete": goals is not None or (a.baselines_only and saved.get("complete", False))})

    if a.baselines_only:
        rows += baseline_rows(a.task, a.alpha, a.baseline_seeds)
        save()
        plot(rows, a.task, a.alpha, name)
        return

    # most important first; runs sharing the 3-institution setup together (prefix cache reused)
    plan = [("federated DP eps=8", True, 8.0, lambda: [run(InProcessJob(**common))]),
            ("federated non-DP", False, None, lambda: [run(InProcessJob(**common, dp=False))]),
            ("local-only DP eps=8 (mean of 3)", True, 8.0,
             lambda: [run(InProcessJob(**common, sites=[i])) for i in range(3)]),
            ("federated DP eps=3", True, 3.0, lambda: [run(InProcessJob(**common, epsilon=3.0))]),
            ("federated DP eps=1", True, 1.0, lambda: [run(InProcessJob(**common, epsilon=1.0))]),
            ("centralized non-DP", False, None, lambda: [run(InProcessJob(**common, dp=False, institutions=1))]),
            ("centralized DP eps=8", True, 8.0, lambda: [run(InProcessJob(**common, institutions=1))]),
            ("federated FFA-LoRA DP eps=8", True, 8.0, lambda: [run(InProcessJob(**common, ffa=True))])]
    if a.nondp_lr:
        lr = a.nondp_lr
        plan += [(f"centralized non-DP lr={lr:g}", False, None,
                  lambda: [run(InProcessJob(**common, dp=False, institutions=1, lr=lr))]),
                 (f"federated non-DP lr={lr:g}", False, None, lambda: [run(InProcessJob(**common, dp=False, lr=lr))])]
    for setting, dp, eps, go in plan:
        if a.only and setting not in a.only:
            continue
        record(setting, dp, eps, go())
        save()

    if not a.only:
        rows += baseline_rows(a.task, a.alpha, a.baseline_seeds)
    by = {r["setting"]: r["accuracy"] for r in rows}
    fed8 = by.get("federated DP eps=8")
    central = max((v for k, v in by.items() if k.startswith("centralized non-DP")), default=None)
    local, ffa = by.get("local-only DP eps=8 (mean of 3)"), by.get("federated FFA-LoRA DP eps=8")
    goals = {"federated_dp8_over_centralized_nondp": fed8 / central if fed8 and central else None,
             "goal_90pct_met": fed8 >= 0.9 * central if fed8 and central else None,
             "federated_dp8_minus_local_only_points": 100 * (fed8 - local) if fed8 and local else None,
             "goal_plus10_points_met": fed8 - local >= 0.10 if fed8 and local else None,
             "ffa_minus_naive_points": 100 * (ffa - fed8) if fed8 and ffa else None}
    print(goals, flush=True)
    save(goals)
    plot(rows, a.task, a.alpha, name)

if __name__ == "__main__":
    main()
