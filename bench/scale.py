"""Scale benchmark.

1. Server aggregation memory vs number of client updates (up to 1,000) with the embedded model's
   adapter shapes: holding every update then averaging (what a plain FedAvg does) vs the streaming
   average the strategy uses (each update decoded and folded in, then dropped). Peak Python/numpy
   heap from tracemalloc (numpy registers its buffers with it).
2. Simulation throughput: `fedseek simulate` (Flower simulation engine, Ray) with 3, 30 and 100
   institutions on tiny jobs (20 banking77 rows and 2 DP steps per institution per round), client
   rounds per minute in the steady state (rounds 2..R, after Ray start-up and model loading).

    python bench/scale.py [--clients 3 30 100] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from bench_io import pyplot, save_figure, write_json
from fedseek.aggregator.aggregation import StreamingAverage, weighted_average
from fedseek.aggregator.compression import CompressionSettings, decode, encode


def adapter_shapes() -> dict[str, tuple]:
    from fedseek.models.classifier import AdapterClassifier
    from fedseek.models.lora import LoraSettings, trainable_state

    model = AdapterClassifier(None, 77, LoraSettings()).model
    return {k: tuple(v.shape) for k, v in trainable_state(model).items()}


def updates(shapes: dict, count: int, codec: str = "none"):
    """`count` client updates made one at a time, as they would arrive (float32, or encoded)."""
    for i in range(count):
        rng = np.random.default_rng(i)
        update = {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in shapes.items()}
        yield encode(update, CompressionSettings(codec=codec)) if codec != "none" else update


def peak_bytes(fn) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def aggregation_memory(shapes: dict, counts: list[int]) -> list[dict]:
    like = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    rows = []
    for n in counts:
        def held():
            received = list(updates(shapes, n))
            weighted_average(received, [1.0] * n)

        def streamed(codec="none"):
            average = StreamingAverage()
            for payload in updates(shapes, n, codec):
                average.add(decode(payload, like) if codec != "none" else payload, 1.0)
            average.result()

        row = {"clients": n, "held_list_bytes": peak_bytes(held), "streaming_bytes": peak_bytes(streamed),
               "streaming_int8_bytes": peak_bytes(lambda: streamed("int8"))}
        print(row, flush=True)
        rows.append(row)
    return rows


def throughput(clients: int, rounds: int, rows_per_client: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        started = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", "fedseek", "simulate", "--institutions", str(clients), "--rounds", str(rounds),
             "--local-steps", str(steps), "--max-train-rows", str(rows_per_client * clients), "--out", out],
            capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        wall = time.time() - started
        if proc.returncode:
            raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
        report = json.loads((Path(out) / "report.json").read_text())
    elapsed = [r["elapsed_s"] for r in report["rounds"]]
    steady = (elapsed[-1] - elapsed[0]) / (rounds - 1)
    row = {"clients": clients, "rounds": rounds, "wall_s": round(wall, 1), "round_s": elapsed,
           "steady_round_s": round(steady, 2), "client_rounds_per_min": round(60 * clients / steady, 1),
           "end_to_end_client_rounds_per_min": round(60 * clients * rounds / wall, 1),
           "final_accuracy": report["final_accuracy"]}
    print(row, flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clients", type=int, nargs="+", default=[3, 30, 100])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rows-per-client", type=int, default=20)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--memory-counts", type=int, nargs="+", default=[1, 10, 100, 300, 1000])
    a = p.parse_args()
    shapes = adapter_shapes()
    memory = aggregation_memory(shapes, a.memory_counts)
    speed = [throughput(n, a.rounds, a.rows_per_client, a.local_steps) for n in a.clients]
    adapter_bytes = 4 * sum(int(np.prod(s)) for s in shapes.values())
    write_json("scale", {"command": "python bench/scale.py", "adapter_float32_bytes": adapter_bytes,
                         "aggregation_memory": memory, "throughput": speed, "args": vars(a)})
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    n = [r["clients"] for r in memory]
    left.plot(n, [r["held_list_bytes"] / 2**20 for r in memory], "o-", label="hold all updates, then average")
    left.plot(n, [r["streaming_bytes"] / 2**20 for r in memory], "s-", label="streaming (float32 uploads)")
    left.plot(n, [r["streaming_int8_bytes"] / 2**20 for r in memory], "^-", label="streaming (int8 uploads)")
    left.set(xscale="log", yscale="log", xlabel="client updates aggregated", ylabel="peak heap (MiB)",
             title=f"aggregation memory (adapter {adapter_bytes / 1024:.0f} KiB)")
    left.legend(fontsize=8)
    right.plot([r["clients"] for r in speed], [r["client_rounds_per_min"] for r in speed], "o-", label="steady state")
    right.plot([r["clients"] for r in speed], [r["end_to_end_client_rounds_per_min"] for r in speed], "s--",
               label="end to end (incl. Ray start-up)")
    right.set(xscale="log", xlabel="simulated institutions", ylabel="client rounds per minute",
              title="Flower simulation throughput, 2 cores")
    right.legend(fontsize=8)
    save_figure(fig, "scale")


if __name__ == "__main__":
    main()
