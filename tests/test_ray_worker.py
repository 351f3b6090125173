"""Institutions' training workers on Ray: a real local Ray instance declaring two (fake) GPUs.
There is no GPU here, so Ray's bookkeeping is what is tested: each worker is given its own GPU id
(and CUDA_VISIBLE_DEVICES), a third worker waits until a GPU is free, named workers are reused,
and the same code path runs on CPU when torch sees no CUDA device. A real ClientApp handler runs
on a worker and its node state comes back to the caller."""
from __future__ import annotations

import csv

import pytest
import ray
from flwr.app import ConfigRecord, Context, RecordDict

from fedseek.clients.ray_worker import SiteWorker, run_on_worker, worker_options
from fedseek.config import JobConfig


@pytest.fixture(scope="module")
def two_gpu_ray():
    ray.init(address="local", num_cpus=2, num_gpus=2, namespace="fedseek", include_dashboard=False,
             log_to_driver=False)
    yield
    ray.shutdown()


def worker(name: str, gpus: float = 1.0):
    return SiteWorker.options(**worker_options({"institution": name, "num-gpus": gpus, "num-cpus": 0.1})).remote()


def test_workers_get_distinct_gpus_and_a_third_waits_for_a_free_one(two_gpu_ray):
    a, b = worker("hospital_a"), worker("hospital_b")
    got_a, got_b = ray.get([a.resources.remote(), b.resources.remote()], timeout=180)
    assert len(got_a["gpu_ids"]) == len(got_b["gpu_ids"]) == 1
    assert got_a["gpu_ids"] != got_b["gpu_ids"]
    assert got_a["cuda_visible_devices"] == got_a["gpu_ids"][0]
    assert got_a["device"] == "cpu"  # fake GPUs: torch sees no CUDA device, the CPU path runs
    assert ray.get(worker("hospital_a").resources.remote(), timeout=60)["pid"] == got_a["pid"]  # reused
    third = worker("hospital_c").resources.remote()
    ready, _ = ray.wait([third], timeout=15)
    assert not ready  # both GPUs are held: Ray does not over-subscribe them
    ray.kill(a)
    assert ray.get(third, timeout=180)["gpu_ids"] == got_a["gpu_ids"]  # the freed GPU
    ray.kill(b)
    ray.kill(ray.get_actor("site-hospital_c"))


def test_a_clientapp_handler_runs_on_the_site_worker_and_returns_its_state(two_gpu_ray, tmp_path):
    path = tmp_path / "site.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(40):
            writer.writerow([f"my card number {i} was declined at the shop", "declined_card_payment"
                             if i % 2 else "card_arrival"])
    job = JobConfig()
    config = ConfigRecord({**job.to_flat(), "label-names": ["card_arrival", "declined_card_payment"]})
    context = Context(run_id=1, node_id=7, node_config={"institution": "hospital_d", "data-path": str(path),
                                                        "ray-address": "local", "num-gpus": 0.0},
                      state=RecordDict({"stale": ConfigRecord({"x": 1})}), run_config={})
    reply = run_on_worker("query.census", RecordDict({"config": config}), context)
    assert reply["site"]["institution"] == "hospital_d" and reply["metrics"]["num-examples"] == 40
    assert "stale" in context.state  # the worker's copy of the node state came back unchanged
    ray.kill(ray.get_actor("site-hospital_d"))
