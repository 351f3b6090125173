"""DP recipe sweep that chose `fedseek simulate`'s defaults: the default federated DP job (banking77,
3 banks IID, 5 rounds x 12 steps, eps = 8, q = 0.125) in process (`inprocess_federation.py`), one
setting changed at a time: adapted layers, learning rate with clip norm, FFA-LoRA, expected batch,
local steps; some settings also without DP. Seeded, one run per row.

    python bench/recipe_sweep.py            # every row (--only NAME ... for some; others kept)

Writes bench/results/recipe_sweep.json and recipe_sweep.png.
"""
from __future__ import annotations

import argparse
import json

from bench_io import RESULTS, pyplot, save_figure, write_json
from inprocess_federation import InProcessJob, run

# name: (InProcessJob overrides, also without DP?)
SWEEP = {
    "L2 lr 5e-3 C 0.5": (dict(lora_layers=2, lr=5e-3, clip=0.5), True),
    "L2 lr 1e-2 C 0.5": (dict(lora_layers=2, lr=1e-2, clip=0.5), False),
    "L2 lr 5e-3 C 0.5 FFA r8": (dict(lora_layers=2, lr=5e-3, clip=0.5, ffa=True, lora_rank=8), False),
    "L2 lr 5e-3 C 0.5 q 0.25": (dict(lora_layers=2, lr=5e-3, clip=0.5, batch_fraction=0.25), False),
    "L1 lr 5e-3 C 0.5": (dict(lora_layers=1, lr=5e-3, clip=0.5), False),
    "L2 lr 2e-2 C 1": (dict(lora_layers=2, lr=2e-2, clip=1.0), False),
    "L1 lr 2e-2 C 1 (default)": (dict(lora_layers=1, lr=2e-2, clip=1.0), True),
    "L1 lr 3e-2 C 1": (dict(lora_layers=1, lr=3e-2, clip=1.0), False),
    "L1 lr 2e-2 C 1, 24 steps": (dict(lora_layers=1, lr=2e-2, clip=1.0, local_steps=24), True),
}


def plot(rows: list[dict]) -> None:
    plt = pyplot()
    names = list(dict.fromkeys(r["setting"] for r in rows))
    by = {(r["setting"], r["dp"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for offset, dp, color, label in ((-0.2, True, "tab:blue", "DP eps=8"), (0.2, False, "tab:gray", "non-DP")):
        for i, name in enumerate(names):
            row = by.get((name, dp))
            if row:
                ax.barh(i + offset, 100 * row["accuracy"], height=0.4, color=color, label=label)
                label = None  # one legend entry per kind
                ax.text(100 * row["accuracy"] + 0.5, i + offset, f"{100 * row['accuracy']:.1f}", va="center", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="banking77 test accuracy (%)", title="DP recipe sweep: 3 banks IID, 5 rounds x 12 steps, eps=8")
    ax.legend(fontsize=8)
    save_figure(fig, "recipe_sweep")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(SWEEP), help="run only these rows; keep the others saved")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    saved = RESULTS / "recipe_sweep.json"
    rows = ([r for r in json.loads(saved.read_text())["rows"] if r["setting"] not in args.only]
            if args.only and saved.is_file() else [])
    for name, (overrides, also_nodp) in SWEEP.items():
        if args.only and name not in args.only:
            continue
        for dp in (True, False) if also_nodp else (True,):
            result = run(InProcessJob(**overrides, dp=dp, seed=args.seed), log=None)
            rows.append({"setting": name, "dp": dp, "overrides": overrides, "accuracy": result["final_accuracy"],
                         "accuracy_per_round": [r["accuracy"] for r in result["rounds"]], "wall_s": result["wall_s"]})
            print(json.dumps(rows[-1]), flush=True)
            write_json("recipe_sweep", {"command": "python bench/recipe_sweep.py", "seed": args.seed, "rows": rows})
    plot(rows)


if __name__ == "__main__":
    main()
