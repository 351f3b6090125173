"""Federation overhead of the real deployment: wall time of a round on the loopback deployment
(SuperLink + 3 SuperNodes with TLS and node auth, ClientApp SuperExecs, training on Ray site
workers) ÷ the same local work in one process (the three institutions' DP rounds one after the
other + aggregation + the server's evaluation), for each local work size side by side in one run;
plus the bytes each institution uploads per round, the CPU seconds of each component and the
stages of each round read from the components' timestamped logs.

    .venv/bin/python bench/deployment.py                       # 400 x 4 and 2334 x 12, 3 rounds
    .venv/bin/python bench/deployment.py --work 400x4 --name deployment_small

`--work RECORDSxSTEPS` (repeatable): records per institution and DP steps per round; 2334 x 12 is
the default job's local work (each bank's whole IID share). Writes bench/results/<name>.json and
<name>.png. Untracked job (no platform DB/MLflow time in either arm). `--plot-only` re-plots.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from datetime import datetime
from pathlib import Path

from bench_io import RESULTS, machine, pyplot, save_figure, write_json

SITES = ("bank_a", "bank_b", "bank_c")
STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\S*:\s+(.*)$")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def events(text: str, wanted: dict[str, str]) -> dict[str, list[float]]:
    """Times (epoch s) of the timestamped log lines containing each `wanted` pattern, in order."""
    found = {key: [] for key in wanted}
    for line in ANSI.sub("", text).splitlines():
        match = STAMP.search(line)
        if not match:
            continue
        stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        for key, pattern in wanted.items():
            if pattern in match.group(2):
                found[key].append(stamp)
    return found


def stages(fed, job_output: str, rounds: int) -> dict:
    """Mean seconds per stage of the steady rounds (2..), from the ServerApp's and each site's
    SuperNode and ClientApp logs (`fedseek.platform.deploy.launch` timestamps Flower's lines)."""
    server = events(job_output, {"round": "[ROUND ", "configure": "configure_train:", "aggregate": "aggregate_train:"})
    if len(server["configure"]) < rounds or len(server["aggregate"]) < rounds:
        return {}
    rows = {k: [] for k in ("dispatch", "pull_from_superlink", "to_clientapp", "clientapp", "reply_to_superlink",
                            "push_to_superlink", "supernode_to_reply")}
    sent_last = []
    for k in range(1, rounds):
        sent = []
        for site in SITES:
            node = events(fed.log(f"supernode-{site}"), {"recv": "Receiving: train", "recvd": "Received successfully",
                                                        "send": "Sending: train", "sent": "Sent successfully"})
            app = events(fed.log(f"clientapp-{site}"), {"pulled": "train message pulled", "pushed": "reply pushed"})
            recv = [t for t in node["recv"] if t >= server["configure"][k]][0]
            recvd = [t for t in node["recvd"] if t >= recv][0]
            send = [t for t in node["send"] if t >= recvd][0]
            done = [t for t in node["sent"] if t >= send][0]
            rows["dispatch"].append(recv - server["configure"][k])
            rows["pull_from_superlink"].append(recvd - recv)
            rows["supernode_to_reply"].append(send - recvd)
            rows["push_to_superlink"].append(done - send)
            pulled = [t for t in app["pulled"] if recv <= t <= done]
            pushed = [t for t in app["pushed"] if recv <= t <= done]
            if pulled and pushed:  # the ClientApp's own lines (fedseek.platform.deploy.serve)
                rows["to_clientapp"].append(pulled[0] - recvd)
                rows["clientapp"].append(pushed[0] - pulled[0])
                rows["reply_to_superlink"].append(done - pushed[0])
            sent.append(done)
        sent_last.append(server["aggregate"][k] - max(sent))
    mean = lambda xs: round(sum(xs) / len(xs), 2) if xs else None  # noqa: E731
    after = [b - a for a, b in zip(server["aggregate"][1:], server["round"][2:])]
    return {**{k: mean(v) for k, v in rows.items()}, "collect_replies": mean(sent_last),
            "train_round": mean([a - c for c, a in zip(server["configure"][1:], server["aggregate"][1:])]),
            "evaluate_and_report": mean(after)}


def cpu_seconds(fed) -> dict[str, float]:
    """CPU seconds so far of each component's processes (live descendants and reaped children)."""
    import psutil

    totals = {}
    for name, (_, proc) in fed.named.items():
        try:
            root = psutil.Process(proc.pid)
            total = 0.0
            for p in [root, *root.children(recursive=True)]:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            continue
        totals[name] = total
    return totals


def deployed(root: Path, rows: int, rounds: int, steps: int, keep: Path | None = None) -> dict:
    from fedseek.platform.deploy.local import LocalFederation, write_demo_sites

    root.mkdir(parents=True, exist_ok=True)
    files = write_demo_sites(root, SITES, rows, as_job=True)
    env = {**os.environ, "FEDSEEK_HOME": str(root / "home"), "FEDSEEK_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1"}
    fed, job = LocalFederation(root, env), None
    try:
        started = time.monotonic()
        fed.start(files)
        up = time.monotonic() - started
        before = cpu_seconds(fed)
        job = fed.run("run", "--superlink", fed.superlink, "--ca", "certs/ca.crt", "--rounds", str(rounds),
                      "--local-steps", str(steps), "--out", str(root / "job"), "--no-track",
                      "--set", f"data.max_train_rows={rows * len(SITES)}", timeout=3600)
        if job.returncode:
            raise RuntimeError(job.stdout[-3000:] + job.stderr[-2000:] + fed.log("serverapp")[-2000:])
        after = cpu_seconds(fed)
        report = json.loads((root / "job" / "report.json").read_text())
        stage = stages(fed, job.stdout + job.stderr, rounds)
    finally:
        fed.stop()
        if keep:
            import shutil

            shutil.copytree(root / "logs", keep / f"{rows}x{steps}", dirs_exist_ok=True)
            (keep / f"{rows}x{steps}" / "job.log").write_text(job.stdout + job.stderr if job else "")
    elapsed = [0.0] + [r["elapsed_s"] for r in report["rounds"]]
    groups = {"superlink": ("superlink",), "serverapp": ("serverapp",), "ray (site workers)": ("ray",),
              "supernodes": tuple(f"supernode-{s}" for s in SITES), "clientapps": tuple(f"clientapp-{s}" for s in SITES)}
    cpu = {g: round(sum(after.get(n, 0) - before.get(n, 0) for n in names), 1) for g, names in groups.items()}
    return {"startup_s": round(up, 1), "round_s": [round(b - a, 1) for a, b in zip(elapsed, elapsed[1:])],
            "bytes_up_per_client_per_round": report["bytes_up_per_round"] / len(SITES),
            "final_accuracy": report["final_accuracy"], "epsilon": report["epsilon"],
            "job_cpu_s": cpu, "stages_steady_s": stage}


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


def steady(times: list[float]) -> float:
    """Mean of rounds 2.. (round 1 of the deployment also loads the model on each site worker)."""
    return sum(times[1:]) / max(1, len(times) - 1)


def measure(rows: int, steps: int, rounds: int, keep: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="fedseek-bench-deploy-") as tmp:
        root = Path(tmp)
        load_before = os.getloadavg()
        deploy = deployed(root / "deployed", rows, rounds, steps, keep)
        from fedseek.platform.deploy.local import write_demo_sites

        local = in_process(write_demo_sites(root, SITES, rows, as_job=True), rounds, steps)
    return {"rows": rows, "local_steps": steps, "deployed": deploy, "in_process": local,
            "load_average_before": [round(x, 2) for x in load_before],
            "overhead_steady_rounds": round(steady(deploy["round_s"]) / steady(local["round_s"]), 3),
            "overhead_all_rounds": round(sum(deploy["round_s"]) / sum(local["round_s"]), 3)}


def plot(result: dict, name: str) -> None:
    plt = pyplot()
    sizes = result["sizes"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.2 * len(sizes), 3.6), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        deploy, local = size["deployed"]["round_s"], size["in_process"]["round_s"]
        xs = range(1, len(deploy) + 1)
        ax.bar([x - 0.2 for x in xs], deploy, width=0.4, color="tab:blue", label="deployed (SuperLink + 3 SuperNodes, TLS)")
        ax.bar([x + 0.2 for x in xs], local, width=0.4, color="tab:gray", label="in process (same local work)")
        for x, d, l in zip(xs, deploy, local):
            ax.text(x - 0.2, d, f"{d:.1f}", ha="center", va="bottom", fontsize=8)
            ax.text(x + 0.2, l, f"{l:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set(xlabel="round", ylabel="seconds", xticks=list(xs),
               title=f"{size['rows']} records x {size['local_steps']} DP steps per site:\n"
                     f"steady rounds {size['overhead_steady_rounds']:.2f}x")
        ax.legend(fontsize=7)
    save_figure(fig, name)


def work_size(text: str) -> tuple[int, int]:
    rows, _, steps = text.partition("x")
    return int(rows), int(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=work_size, action="append",
                        help="RECORDSxSTEPS per institution and round (repeat; default 400x4 and 2334x12)")
    parser.add_argument("--name", default="deployment", help="results file name under bench/results/")
    parser.add_argument("--keep-logs", type=Path, help="copy every component's log here (per work size)")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads((RESULTS / f"{args.name}.json").read_text()), args.name)
        return
    work = args.work or [(400, 4), (2334, 12)]
    started = time.monotonic()
    sizes = [measure(rows, steps, args.rounds, args.keep_logs) for rows, steps in work]
    result = {"command": "python bench/deployment.py --rounds {} {} --name {}".format(
                  args.rounds, " ".join(f"--work {r}x{s}" for r, s in work), args.name),
              "machine": machine(), "wall_s": round(time.monotonic() - started), "sizes": sizes}
    write_json(args.name, result)
    plot(result, args.name)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
