"""Shared by the bench/ scripts: where results go, what machine measured them, plot setup."""
from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One intra-op thread: on a shared 2-core machine two OpenMP threads stall each other at every
# barrier (a 2-step probe took 56 s with 2 threads, 1.7 s with 1). Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def machine() -> dict:
    import torch

    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "torch_threads": torch.get_num_threads(),
            "load_average_at_end": os.getloadavg()}


def own_platform_env(home: Path) -> dict:
    """Environment for a benchmarked `fedseek` job: tracked as a user's job is, into a platform home of
    its own (DB and MLflow store under it), never this machine's real ledger or a configured server."""
    return {**os.environ, "PYTHONWARNINGS": "ignore", "FEDSEEK_HOME": str(home),
            "FEDSEEK_DB_URL": "", "FEDSEEK_MLFLOW_URI": ""}


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**payload, "machine": machine()}, indent=2))
    print(f"wrote {path}", flush=True)
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, name: str) -> Path:
    path = RESULTS / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", flush=True)
    return path
