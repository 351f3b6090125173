"""Run a federated job on Flower's simulation engine (Ray backend) in this process tree."""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from fedseek.config import JobConfig
from fedseek.data.plan import SPLIT_DIR
from fedseek.platform.store.resume import process_alive
from fedseek.quiet import quiet_environment


SPLIT_PREFIX = "fedseek-split-"  # + the owning process id + "-" + mkdtemp's suffix


class SimulationError(RuntimeError):
    """The federation did not finish (a ServerApp or ClientApp failed)."""


def remove_orphaned_splits() -> list[Path]:
    """Remove this user's split directories whose `simulate` process is gone (killed before its
    clean-up: the institutions' records must not stay behind); returns them."""
    removed = []
    for path in Path(tempfile.gettempdir()).glob(f"{SPLIT_PREFIX}*-*"):
        pid = path.name[len(SPLIT_PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or path.stat().st_uid != os.getuid() or process_alive(int(pid)):
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def simulate(job: JobConfig, reporter=None, cpus_per_client: float | None = None,
             verbose: bool = False, run=None) -> dict:
    """Run `job` with `job.federation.institutions` simulated SuperNodes; returns the report.
    `run(grid, job, reporter)` replaces the single federated job (e.g. a continual sequence)."""
    quiet_environment()
    from flwr.simulation import run_simulation

    from fedseek.aggregator.server_app import make_server_app, run_federation
    from fedseek.clients.client_app import app as client_app

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
    kept: dict = {}

    def run_and_keep(grid, job_, reporter_):
        kept["report"] = (run or run_federation)(grid, job_, reporter_)

    cpus = cpus_per_client or float(os.cpu_count() or 1)
    # always a private Ray instance: never join a cluster found on this machine (e.g. a site's Ray
    # head that `ray start` advertised in /tmp/ray/ray_current_cluster)
    os.environ["RAY_ADDRESS"] = "local"
    # the coordinator writes each institution's records to its own file in a directory private to
    # this run (0700, removed at the end); a simulated institution reads only its own
    remove_orphaned_splits()
    splits = tempfile.mkdtemp(prefix=f"{SPLIT_PREFIX}{os.getpid()}-")
    previous, os.environ[SPLIT_DIR] = os.environ.get(SPLIT_DIR), splits
    try:
        run_simulation(
            server_app=make_server_app(job, reporter, run_and_keep), client_app=client_app,
            num_supernodes=job.federation.institutions,
            backend_config={"client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
                            "init_args": {"num_cpus": int(os.cpu_count() or 1), "log_to_driver": verbose,
                                          "include_dashboard": False}},
            verbose_logging=verbose,
        )
    finally:
        shutil.rmtree(splits, ignore_errors=True)
        if previous is None:
            os.environ.pop(SPLIT_DIR, None)
        else:
            os.environ[SPLIT_DIR] = previous
    if "report" not in kept:
        raise SimulationError("the federation did not finish; rerun with --verbose to see the "
                              "ServerApp/ClientApp errors")
    return kept["report"]
