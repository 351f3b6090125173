"""Scale benchmark.

1. Server aggregation memory vs number of client updates (up to 1,000) with the embedded model's
   adapter shapes: holding every update then averaging (what a plain FedAvg does) vs the streaming
   average the strategy uses (each update decoded and folded in, then dropped). Peak Python/numpy
   heap from tracemalloc (numpy registers its buffers with it).
2. Simulation throughput: `fedseek simulate` (Flower simulation engine, Ray) with 3, 30 and 100
   institutions on tiny jobs (20 banking77 rows and 2 steps per institution per round), client
   rounds per minute in the steady state (rounds 2..R, after Ray start-up and model loading),
   without DP for 3/30/100 and with DP for 3/30 (with DP each institution derives its sigma from
   the PRV accountant in round 1 and computes its cumulative epsilon every round; the cost of
   those accountant calls is timed separately).

    python bench/scale.py [--clients 3 30 100] [--dp-clients 3 30] [--reuse]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from bench_io import RESULTS, own_platform_env, pyplot, save_figure, write_json
from fedseek.aggregator.aggregation import StreamingAverage, weighted_average
from fedseek.config import CompressionSettings
from fedseek.wire.compression import decode, encode


def adapter_shapes() -> dict[str, tuple]:
    from fedseek.models.classifier import AdapterClassifier
    from fedseek.models.lora import trainable_state
    from fedseek.config import LoraSettings

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


def throughput(clients: int, rounds: int, rows_per_client: int, steps: int, dp: bool) -> dict:
    with tempfile.TemporaryDirectory() as out:
        started = time.time()
        proc = subprocess.run(
            [sys.executable, "-m", "fedseek", "simulate", "--institutions", str(clients), "--rounds", str(rounds),
             "--local-steps", str(steps), "--max-train-rows", str(rows_per_client * clients), "--out", out]
            + ([] if dp else ["--no-dp"]), capture_output=True, text=True,
            env=own_platform_env(Path(out) / "home"))
        wall = time.time() - started
        if proc.returncode:
            raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
        report = json.loads((Path(out) / "report.json").read_text())
    elapsed = [r["elapsed_s"] for r in report["rounds"]]
    steady = (elapsed[-1] - elapsed[0]) / (rounds - 1)
    row = {"clients": clients, "dp": dp, "rounds": rounds, "wall_s": round(wall, 1), "round_s": elapsed,
           "steady_round_s": round(steady, 2), "client_rounds_per_min": round(60 * clients / steady, 1),
           "end_to_end_client_rounds_per_min": round(60 * clients * rounds / wall, 1),
           "final_accuracy": report["final_accuracy"]}
    print(row, flush=True)
    return row


def accountant_seconds(q: float = 0.125, steps: int = 2, rounds: int = 3) -> dict:
    """What one DP institution's accountant calls cost: sigma for the job's budget (round 1), then
    the cumulative PRV and RDP epsilon of its history (every round)."""
    from fedseek.privacy.accountant import epsilon, noise_for_budget

    start = time.perf_counter()
    sigma = noise_for_budget(8.0, 1e-5, q, steps * rounds)
    budget = time.perf_counter() - start
    start = time.perf_counter()
    epsilon([(sigma, q, steps)] * 2, 1e-5)
    prv = time.perf_counter() - start
    start = time.perf_counter()
    epsilon([(sigma, q, steps)] * 2, 1e-5, "rdp")
    return {"noise_for_budget_s": budget, "epsilon_prv_s": prv, "epsilon_rdp_s": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--clients", type=int, nargs="+", default=[3, 30, 100])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rows-per-client", type=int, default=20)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--memory-counts", type=int, nargs="+", default=[1, 10, 100, 300, 1000])
    p.add_argument("--dp-clients", type=int, nargs="+", default=[3, 30])
    p.add_argument("--reuse", action="store_true", help="keep the rows of the saved JSON, run only missing ones")
    p.add_argument("--rerun-dp", action="store_true", help="with --reuse: run the DP rows again (kept: the others)")
    a = p.parse_args()
    saved = json.loads((RESULTS / "scale.json").read_text()) if a.reuse and (RESULTS / "scale.json").is_file() else {}
    shapes = adapter_shapes()
    adapter_bytes = 4 * sum(int(np.prod(s)) for s in shapes.values())
    state = {"command": "python bench/scale.py", "adapter_float32_bytes": adapter_bytes, "args": vars(a),
             "aggregation_memory": saved.get("aggregation_memory") or aggregation_memory(shapes, a.memory_counts),
             "throughput": [r for r in saved.get("throughput", []) if not (a.rerun_dp and r.get("dp", True))], "accountant": saved.get("accountant") or accountant_seconds()}
    write_json("scale", state)
    for n, dp in [(n, False) for n in a.clients] + [(n, True) for n in a.dp_clients]:
        if not any(r["clients"] == n and r.get("dp", True) == dp for r in state["throughput"]):
            state["throughput"].append(throughput(n, a.rounds, a.rows_per_client, a.local_steps, dp))
            write_json("scale", state)
    memory, speed = state["aggregation_memory"], state["throughput"]
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    n = [r["clients"] for r in memory]
    left.plot(n, [r["held_list_bytes"] / 2**20 for r in memory], "o-", label="hold all updates, then average")
    left.plot(n, [r["streaming_bytes"] / 2**20 for r in memory], "s-", label="streaming (float32 uploads)")
    left.plot(n, [r["streaming_int8_bytes"] / 2**20 for r in memory], "^-", label="streaming (int8 uploads)")
    left.set(xscale="log", yscale="log", xlabel="client updates aggregated", ylabel="peak heap (MiB)",
             title=f"aggregation memory (adapter {adapter_bytes / 1024:.0f} KiB)")
    left.legend(fontsize=8)
    for dp, marker in ((False, "o"), (True, "s")):
        rows = sorted((r for r in speed if r.get("dp", True) == dp), key=lambda r: r["clients"])
        tag = "DP eps=8" if dp else "no DP"
        right.plot([r["clients"] for r in rows], [r["client_rounds_per_min"] for r in rows], marker + "-",
                   label=f"{tag}, steady state")
        right.plot([r["clients"] for r in rows], [r["end_to_end_client_rounds_per_min"] for r in rows],
                   marker + "--", label=f"{tag}, end to end (incl. Ray start-up)")
    right.set(xscale="log", xlabel="simulated institutions", ylabel="client rounds per minute",
              title="Flower simulation throughput, 2 cores")
    right.legend(fontsize=8)
    save_figure(fig, "scale")


if __name__ == "__main__":
    main()
