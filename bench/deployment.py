"""Federation overhead of the real deployment: wall time of a round on the loopback deployment
(SuperLink + 3 SuperNodes with TLS and node auth, ClientApp per message, training on Ray site
workers) ÷ the same local work in one process (the three institutions' DP rounds one after the
other + aggregation + the server's evaluation), and the bytes each institution uploads per round.

    .venv/bin/python bench/deployment.py [--rounds 3] [--local-steps 4] [--rows 400]
    .venv/bin/python bench/deployment.py --local-steps 12 --rows 2334 --name deployment_default_work

Writes bench/results/<name>.json and <name>.png (per-round times of both arms). Untracked job (no
platform DB/MLflow time in either arm). `--plot-only` re-plots a saved JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from bench_io import RESULTS, pyplot, save_figure, write_json

SITES = ("bank_a", "bank_b", "bank_c")


def deployed(root: Path, files: dict[str, Path], rounds: int, steps: int) -> dict:
    from fedseek.platform.deploy.local import LocalFederation

    env = {**os.environ, "FEDSEEK_HOME": str(root / "home"), "FEDSEEK_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1"}
    fed = LocalFederation(root, env)
    try:
        started = time.monotonic()
        fed.start(files)
        up = time.monotonic() - started
        job = fed.run("run", "--superlink", fed.superlink, "--ca", "certs/ca.crt", "--rounds", str(rounds),
                      "--local-steps", str(steps), "--out", str(root / "job"), "--no-track", timeout=3600)
        if job.returncode:
            raise RuntimeError(job.stdout[-3000:] + job.stderr[-2000:] + fed.log("serverapp")[-2000:])
        report = json.loads((root / "job" / "report.json").read_text())
    finally:
        fed.stop()
    elapsed = [0.0] + [r["elapsed_s"] for r in report["rounds"]]
    return {"startup_s": round(up, 1), "round_s": [round(b - a, 1) for a, b in zip(elapsed, elapsed[1:])],
            "bytes_up_per_client_per_round": report["bytes_up_per_round"] / len(SITES),
            "final_accuracy": report["final_accuracy"], "epsilon": report["epsilon"]}


def in_process(files: dict[str, Path], rounds: int, steps: int) -> dict:
    """The same rounds with the same code, no Flower/Ray/TLS: train each site, average, evaluate."""
    import numpy as np
    import torch

    from fedseek.aggregator.aggregation import StreamingAverage
    from fedseek.clients.dp_trainer import LocalTrainer
    from fedseek.config import JobConfig
    from fedseek.data.loader import read_labelled_file
    from fedseek.data.tasks import load_federated_data
    from fedseek.models.classifier import AdapterClassifier
    from fedseek.models.lora import load_trainable_state, trainable_state

    torch.set_num_threads(1)
    job = JobConfig()
    job.federation.rounds, job.optim.local_steps = rounds, steps
    data = load_federated_data("banking77", institutions=3, seed=0)
    server = AdapterClassifier(None, len(data.label_names), job.lora, job.data.max_length)
    test = server.encode(data.test.texts, data.test.labels)
    trainer = LocalTrainer(AdapterClassifier(None, len(data.label_names), job.lora, job.data.max_length))
    sites = {}
    for name, path in files.items():
        rows = read_labelled_file(path, "text", "label", label_names=data.label_names)
        sites[name] = trainer.classifier.encode(rows.texts, rows.labels)
    histories = {name: [] for name in sites}
    global_state = trainable_state(server.model)
    times, accuracy = [], None
    for server_round in range(1, rounds + 1):
        started = time.monotonic()
        average = StreamingAverage()
        for k, (name, encoded) in enumerate(sites.items()):
            load_trainable_state(trainer.classifier.model, global_state)
            result = trainer.train_round(encoded, job.privacy, job.optim, server_round, rounds, histories[name], k)
            histories[name] = result.history
            average.add({n: t.numpy() for n, t in trainable_state(trainer.classifier.model).items()}, len(encoded))
        global_state = {n: torch.from_numpy(np.asarray(v)) for n, v in average.result().items()}
        load_trainable_state(server.model, global_state)
        accuracy = server.evaluate(test)["accuracy"]
        times.append(round(time.monotonic() - started, 1))
    return {"round_s": times, "final_accuracy": accuracy}


def plot(result: dict, name: str) -> None:
    plt = pyplot()
    deploy, local = result["deployed"]["round_s"], result["in_process"]["round_s"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    xs = range(1, len(deploy) + 1)
    ax.bar([x - 0.2 for x in xs], deploy, width=0.4, color="tab:blue", label="deployed (SuperLink + 3 SuperNodes, TLS)")
    ax.bar([x + 0.2 for x in xs], local, width=0.4, color="tab:gray", label="in process (same local work)")
    for x, d, l in zip(xs, deploy, local):
        ax.text(x - 0.2, d, f"{d:.0f}", ha="center", va="bottom", fontsize=8)
        ax.text(x + 0.2, l, f"{l:.0f}", ha="center", va="bottom", fontsize=8)
    args = result["args"]
    ax.set(xlabel="round", ylabel="seconds", xticks=list(xs),
           title=f"{args['rows']} records x {args['local_steps']} DP steps per site: "
                 f"steady rounds {result['overhead_steady_rounds']:.2f}x")
    ax.legend(fontsize=8)
    save_figure(fig, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--rows", type=int, default=400, help="records per institution (at most its IID share)")
    parser.add_argument("--name", default="deployment", help="results file name under bench/results/")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    if args.plot_only:
        saved = json.loads((RESULTS / f"{args.name}.json").read_text())
        plot(saved, args.name)
        return
    with tempfile.TemporaryDirectory(prefix="fedseek-bench-deploy-") as tmp:
        root = Path(tmp)
        from fedseek.platform.deploy.local import write_demo_sites

        files = write_demo_sites(root, SITES, args.rows)
        deploy = deployed(root, files, args.rounds, args.local_steps)
        local = in_process(files, args.rounds, args.local_steps)
    # round 1 of the deployment also loads the model on each site worker: compare later rounds
    steady = lambda times: sum(times[1:]) / max(1, len(times) - 1)  # noqa: E731
    result = {"command": "python bench/deployment.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "plot_only"),
              "args": {k: v for k, v in vars(args).items() if k != "plot_only"},
              "deployed": deploy, "in_process": local,
              "overhead_steady_rounds": round(steady(deploy["round_s"]) / steady(local["round_s"]), 3),
              "overhead_all_rounds": round(sum(deploy["round_s"]) / sum(local["round_s"]), 3)}
    write_json(args.name, result)
    plot(result, args.name)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
