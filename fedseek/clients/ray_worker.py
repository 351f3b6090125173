"""An institution's local training as a Ray actor on its own Ray cluster (GPU workers).

In deployment the ClientApp runs in a process of the institution's ClientApp SuperExec (one per
message with Flower's own executor; one for all messages with `fedseek.platform.deploy.serve`).
When the node config names a Ray cluster (`ray-address`), that process only forwards the message
to a named, detached `SiteWorker` actor of the institution, which holds the base model, the
encoded records and the frozen-prefix cache across rounds and jobs, and is placed by Ray on a
worker with the institution's `num-gpus` / `num-cpus`. Without a GPU the same actor runs on CPU.
A process joins the Ray cluster once and keeps the actor's handle, so in a long-lived process a
message costs one actor call; a Ray failure drops both, and the next message joins again.
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


_HANDLES: dict[tuple[str, str], object] = {}  # (ray address, actor name) -> this process's handle


def site_worker(node_config: dict):
    """The institution's actor (created on first use), its handle kept for this process."""
    address, options = str(node_config["ray-address"]), worker_options(node_config)
    connect(address)
    key = (address, options["name"])
    if key not in _HANDLES:
        _HANDLES[key] = SiteWorker.options(**options).remote()
    return _HANDLES[key]


def forget_workers() -> None:
    """After a Ray failure: drop the handles and leave the cluster (the next message joins again)."""
    _HANDLES.clear()
    if ray.is_initialized():
        ray.shutdown()


def run_on_worker(kind: str, content: RecordDict, context: Context) -> RecordDict:
    """Run one handler on the institution's worker; its updated node state (privacy history,
    compression residual) is copied back into `context` for the SuperNode to keep."""
    worker = site_worker(dict(context.node_config))
    try:
        reply, state = ray.get(worker.handle.remote(kind, content, context))
    except ray.exceptions.RayTaskError:  # raised in the actor's code: the actor and cluster are fine
        raise
    except ray.exceptions.RayError:  # the actor or the cluster failed
        forget_workers()
        raise
    for key in list(context.state.keys()):
        if key not in state:
            del context.state[key]
    for key, record in state.items():
        context.state[key] = record
    return reply
