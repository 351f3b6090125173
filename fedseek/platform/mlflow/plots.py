"""PNG plots for MLflow and `fedseek privacy --plot`: training curves and epsilon over time (the
continual-learning accuracy matrix is `fedseek.continual.report.heatmap_png`)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def curves(rows: list[dict], path: Path) -> Path:
    """Global test accuracy and loss per round."""
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(9, 3.5))
    rounds = [r["round"] for r in rows]
    acc.plot(rounds, [r["accuracy"] for r in rows], marker="o")
    acc.set(title="global test accuracy", xlabel="round", ylabel="accuracy")
    loss.plot(rounds, [r["loss"] for r in rows], marker="o", label="test loss")
    loss.plot(rounds, [r.get("train_loss") for r in rows], marker="x", label="train loss")
    loss.set(title="loss", xlabel="round")
    loss.legend()
    return _save(fig, path)


def epsilon_over_time(series: dict[str, list[tuple[object, float]]], budgets: dict[str, float],
                      path: Path, xlabel: str = "ledger entry") -> Path:
    """One line per institution: cumulative epsilon after each ledger entry, with its budget."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in sorted(series.items()):
        line, = ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=name,
                        drawstyle="steps-post")
        if name in budgets:
            ax.axhline(budgets[name], color=line.get_color(), linestyle="--", linewidth=0.8)
    ax.set(title="privacy spent per institution (PRV; dashed: budget)", xlabel=xlabel, ylabel="epsilon")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.autofmt_xdate()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
