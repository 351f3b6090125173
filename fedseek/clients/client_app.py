"""Flower ClientApp: one institution's local DP-LoRA training.

The base model is loaded once per process and the site's records are tokenized (and their frozen
prefix computed) once per process; each round applies the received adapter, trains with DP-SGD and
replies with the trainable tensors only. The accountant history lives in the node's persistent
`context.state`, so epsilon composes over every round of the job.
"""
from __future__ import annotations

import zlib
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedseek.aggregator.compression import CompressionSettings, compress, delta_between
from fedseek.clients.dp_trainer import LocalTrainer
from fedseek.config import JobConfig, data_arguments
from fedseek.data.loader import read_labelled_file
from fedseek.data.tasks import load_federated_data
from fedseek.models.classifier import AdapterClassifier, EncodedTexts
from fedseek.models.lora import load_trainable_state, trainable_state

app = ClientApp()
PRIVACY_STATE = "privacy-history"
COMPRESSION_STATE = "compression-residual"


@lru_cache(maxsize=2)
def _trainer(base: str | None, num_labels: int, lora_key: tuple, max_length: int) -> LocalTrainer:
    from fedseek.models.lora import LoraSettings

    lora = LoraSettings(*lora_key)
    return LocalTrainer(AdapterClassifier(base, num_labels, lora, max_length))


def trainer_for(job: JobConfig, num_labels: int) -> LocalTrainer:
    lora = job.lora
    key = (lora.rank, lora.alpha, lora.targets, lora.top_layers, lora.ffa, lora.seed, tuple(lora.extra_trainable))
    return _trainer(job.federation.base_model, num_labels, key, job.data.max_length)


_site_cache: dict[tuple, tuple[str, EncodedTexts]] = {}


def site_data(job: JobConfig, node_config: dict, label_names: list[str], trainer: LocalTrainer):
    """(institution name, encoded records). Deployment: the node's own `data-path` file;
    simulation: partition `partition-id` of the job's data, split exactly as the server did."""
    path = node_config.get("data-path")
    key = (path, node_config.get("partition-id"), repr(job.data), job.federation.seed,
           job.federation.institutions, job.federation.base_model)
    if key not in _site_cache:
        if path:
            records = read_labelled_file(path, job.data.text_column, job.data.label_column,
                                         label_names=label_names)
            name = str(node_config.get("institution", path))
        else:
            pid = int(node_config["partition-id"])
            data = load_federated_data(**data_arguments(job))
            records, name = data.train[pid], data.institutions[pid]
        _site_cache[key] = (name, trainer.classifier.encode(records.texts, records.labels))
    return _site_cache[key]


def _history(context: Context) -> list[tuple[float, float, int]]:
    if PRIVACY_STATE not in context.state:
        return []
    record = context.state[PRIVACY_STATE]
    return list(zip(record["sigma"], record["q"], record["steps"]))


def upload(trained: dict[str, np.ndarray], received: dict[str, np.ndarray], context: Context,
           settings: CompressionSettings) -> dict[str, np.ndarray]:
    """What the institution sends: its trained tensors, or with compression its encoded delta
    against the received global adapter (the encoding error kept in the node state for next round)."""
    if not settings.enabled:
        return trained
    residual = ({k: v.numpy() for k, v in context.state[COMPRESSION_STATE].items()}
                if COMPRESSION_STATE in context.state else None)
    payload, residual = compress(delta_between(trained, received), settings, residual)
    if residual:
        context.state[COMPRESSION_STATE] = ArrayRecord({k: Array(v) for k, v in residual.items()})
    return payload


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    job = JobConfig.from_flat(dict(config))
    label_names = list(config["label-names"])
    trainer = trainer_for(job, len(label_names))
    name, data = site_data(job, dict(context.node_config), label_names, trainer)
    received = {k: torch.from_numpy(np.asarray(v.numpy())) for k, v in msg.content["arrays"].items()}
    load_trainable_state(trainer.classifier.model, received)
    server_round = int(config["server-round"])
    result = trainer.train_round(data, job.privacy, job.optim, server_round, job.federation.rounds,
                                 _history(context), job.federation.seed * 7919 + zlib.crc32(name.encode()))
    if result.history:
        context.state[PRIVACY_STATE] = ConfigRecord({
            "sigma": [float(h[0]) for h in result.history], "q": [float(h[1]) for h in result.history],
            "steps": [int(h[2]) for h in result.history]})
    trained = {k: v.numpy() for k, v in trainable_state(trainer.classifier.model).items()}
    sent = upload(trained, {k: v.numpy() for k, v in received.items()}, context, job.compression)
    arrays = ArrayRecord({k: Array(v) for k, v in sent.items()})
    metrics = MetricRecord({
        "num-examples": len(data), "train-loss-first": result.loss_before,
        "train-loss-last": result.loss_after, "delta": result.delta,
        "noise-multiplier": result.noise_multiplier, "sample-rate": result.sample_rate,
        "steps": server_round * result.steps,
        "bytes-up": sum(int(a.numpy().nbytes) for a in arrays.values()),
    })
    if job.privacy.enabled:  # cumulative over the whole history, not this round alone
        metrics["epsilon"], metrics["epsilon-rdp"] = result.epsilon, result.epsilon_rdp
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics,
                                       "site": ConfigRecord({"institution": name})}), reply_to=msg)
