"""An institution's local training as a Ray actor on its own Ray cluster (GPU workers).

In deployment the SuperNode starts one short-lived ClientApp process per message. When the node
config names a Ray cluster (`ray-address`), that process only forwards the message to a named,
detached `SiteWorker` actor of the institution, which holds the base model, the encoded records
and the frozen-prefix cache across rounds and jobs, and is placed by Ray on a worker with the
institution's `num-gpus` / `num-cpus`. Without a GPU the same actor runs on CPU.
"""
from __future__ import annotations

import os

import ray
from flwr.app import Context, RecordDict

NAMESPACE = "fedseek"


@ray.remote
class SiteWorker:
    """Runs `fedseek.clients.handlers.HANDLERS` for one institution, keeping its caches."""

    def __init__(self):
        from fedseek.quiet import quiet_environment

        quiet_environment()
        threads = int(os.environ.get("FEDSEEK_TORCH_THREADS", "0"))
        if threads:
            import torch

            torch.set_num_threads(threads)

    def handle(self, kind: str, content: RecordDict, context: Context) -> tuple[RecordDict, RecordDict]:
        from fedseek.clients.handlers import HANDLERS
        from fedseek.clients.refusals import run_guarded

        reply = run_guarded(kind, HANDLERS[kind], content, context)  # details stay in this log
        return reply, context.state

    def resources(self) -> dict:
        """What Ray gave this worker (asserted by the scheduling tests and shown by operators)."""
        import torch

        return {"gpu_ids": [str(g) for g in ray.get_gpu_ids()], "pid": os.getpid(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "device": "cuda" if torch.cuda.is_available() else "cpu",
                "node_id": ray.get_runtime_context().get_node_id()}


def worker_options(node_config: dict) -> dict:
    """Ray actor options from the node config: a named, detached actor per institution with its
    GPU/CPU reservation."""
    institution = str(node_config.get("institution") or node_config.get("data-path") or "site")
    return {"name": f"site-{institution}", "namespace": NAMESPACE, "lifetime": "detached",
            "get_if_exists": True, "num_gpus": float(node_config.get("num-gpus", 0) or 0),
            "num_cpus": float(node_config.get("num-cpus", 1) or 1), "max_concurrency": 1}


def connect(address: str) -> None:
    """Join the institution's Ray cluster once per process (`local` starts a private one)."""
    if ray.is_initialized():
        return
    if address == "local":
        ray.init(namespace=NAMESPACE, log_to_driver=False, include_dashboard=False, configure_logging=False)
    else:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)


def site_worker(node_config: dict):
    connect(str(node_config["ray-address"]))
    return SiteWorker.options(**worker_options(node_config)).remote()


def run_on_worker(kind: str, content: RecordDict, context: Context) -> RecordDict:
    """Run one handler on the institution's worker; its updated node state (privacy history,
    compression residual) is copied back into `context` for the SuperNode to keep."""
    worker = site_worker(dict(context.node_config))
    reply, state = ray.get(worker.handle.remote(kind, content, context))
    for key in list(context.state.keys()):
        if key not in state:
            del context.state[key]
    for key, record in state.items():
        context.state[key] = record
    return reply
