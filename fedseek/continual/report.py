"""Continual-learning summary: the `cl` block of report.json, a text table and a heat-map PNG."""
from __future__ import annotations

from pathlib import Path

from fedseek.continual.metrics import average_accuracy, backward_transfer, forgetting


def cl_summary(matrix: list[list[float]], periods: list[str], method: str, lam: float | None) -> dict:
    """`matrix[i][j]`: accuracy on period j's test split after training period i (square). Joint
    training has a single row (after all periods): ACC only."""
    square = len(matrix) == len(periods)
    return {"method": method, "lambda": lam, "periods": periods, "accuracy_matrix": matrix,
            "acc": average_accuracy(matrix) if square else sum(matrix[-1]) / len(matrix[-1]),
            "bwt": backward_transfer(matrix) if square else None,
            "forgetting": forgetting(matrix) if square else None}


def heatmap_png(summary: dict, path: str | Path) -> Path:
    """Accuracy-matrix heat-map (rows: after training period i; columns: tested on period j)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix, periods = summary["accuracy_matrix"], summary["periods"]
    rows = periods if len(matrix) == len(periods) else ["all (joint)"]
    fig, ax = plt.subplots(figsize=(1.4 * len(periods) + 2.5, 0.8 * len(rows) + 1.8))
    image = ax.imshow([[100 * v for v in r] for r in matrix], cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, f"{100 * value:.1f}", ha="center", va="center",
                    color="white" if value < 0.6 else "black", fontsize=9)
    ax.set_xticks(range(len(periods)), periods, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("tested on period")
    ax.set_ylabel("after training period")
    lam = f", λ={summary['lambda']:g}" if summary.get("lambda") is not None else ""
    bwt = f" BWT {100 * summary['bwt']:+.1f}" if summary.get("bwt") is not None else ""
    ax.set_title(f"{summary['method']}{lam}: ACC {100 * summary['acc']:.1f}{bwt}", fontsize=10)
    fig.colorbar(image, ax=ax, label="accuracy %")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
