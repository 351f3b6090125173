"""Privacy audit of what leaves an institution: the real ClientApp (`fedseek.clients.client_app.app`)
handles train, train.fisher and evaluate.validation messages for a node holding its own data file,
and every reply — also as the serialized protobuf that goes on the wire — is checked to hold only
adapter tensors named and shaped like the trainable LoRA/head parameters, counts, metrics and
privacy figures, and the institution's name: no text, no token ids, no per-example arrays.
Also checks why Flower's SecAgg+ cannot wrap these replies (docs/security.md)."""
from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.common.serde import message_to_proto

from fedseek.clients import client_app
from fedseek.config import JobConfig, LoraSettings
from fedseek.data.loader import read_labelled_file
from fedseek.models.classifier import AdapterClassifier
from fedseek.models.lora import trainable_state
from fedseek.resources import resource_path
from fedseek.wire.arrays import to_arrays

LABELS = ["card_arrival", "card_linking", "exchange_rate", "lost_or_stolen_card", "pin_blocked"]
ROWS = 57  # no adapter dimension is 57: an axis of that length would be per-example
TRAIN_METRICS = {"num-examples", "train-loss-first", "train-loss-last", "delta", "noise-multiplier",
                 "sample-rate", "steps", "bytes-up", "epsilon", "epsilon-rdp"}
FISHER_METRICS = {"num-examples", "bytes-up", "fisher-noise-multiplier", "fisher-sample-rate",
                  "fisher-steps", "delta", "epsilon", "epsilon-rdp"}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A bank's own CSV (ROWS records of 5 intents from banking77) and the global adapter."""
    source = resource_path("data/shipped", "banking77/train.csv") / "banking77" / "train.csv"
    rows = read_labelled_file(source, "text", "category", label_names=None)
    chosen = [i for i, label in enumerate(rows.labels) if rows.label_names[label] in LABELS][:ROWS]
    path = tmp_path_factory.mktemp("bank") / "bank_audit.csv"
    with path.open("w", encoding="utf-8") as handle:
        handle.write("text,category\n")
        for i in chosen:
            handle.write('"' + rows.texts[i].replace('"', '""') + '",' + rows.label_names[rows.labels[i]] + "\n")
    texts = [rows.texts[i] for i in chosen]
    model = AdapterClassifier(None, len(LABELS), LoraSettings())
    adapter = {k: v.numpy() for k, v in trainable_state(model.model).items()}
    token_ids = [model.tokenizer(t)["input_ids"] for t in texts[:10]]
    return path, texts, adapter, token_ids


def job_config(codec: str = "none") -> dict:
    job = JobConfig()
    job.federation.rounds, job.optim.local_steps = 2, 2
    job.data.label_column, job.data.validation_fraction = "category", 0.2
    job.compression.codec, job.compression.topk = codec, (0.1 if codec != "none" else 0.0)
    return {**job.to_flat(), "label-names": LABELS, "server-round": 1}


def deliver(message_type: str, adapter: dict, config: dict, node: int = 3) -> Message:
    metadata = Metadata(run_id=1, message_id=f"{message_type}-{node}", src_node_id=0, dst_node_id=node,
                        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=3600,
                        message_type=message_type)
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in adapter.items()}),
                               "config": ConfigRecord(config)}), metadata=metadata)


def context(path) -> Context:
    return Context(run_id=1, node_id=3, node_config={"data-path": str(path), "institution": "bank_audit"},
                   state=RecordDict(), run_config={})


def audit_wire(reply: Message, texts: list[str], token_ids: list[list[int]]) -> None:
    """Nothing of the records themselves in the serialized reply: no text, no token-id runs."""
    blob = message_to_proto(reply).SerializeToString()
    assert b"bank_audit" in blob  # the one string that may leave
    for text in texts:
        assert text[:24].encode() not in blob, text
    for ids in token_ids:
        for dtype in (np.int64, np.int32):
            assert np.asarray(ids[:6], dtype).tobytes() not in blob


def audit_records(reply: Message, allowed_metrics: set[str], arrays: bool) -> None:
    content = reply.content
    assert set(content.array_records) == ({"arrays"} if arrays else set())
    assert set(content.metric_records) == {"metrics"}
    assert set(content.config_records) == {"site"}
    assert dict(content["site"]) == {"institution": "bank_audit"}
    metrics = content["metrics"]
    assert set(metrics) <= allowed_metrics, set(metrics) - allowed_metrics
    for key, value in metrics.items():
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)  # scalars only


def audit_tensors(arrays: dict[str, np.ndarray], adapter: dict[str, np.ndarray], compressed: bool = False) -> None:
    for name, value in arrays.items():
        base = name.split("#")[0]
        assert base in adapter, name  # a trainable LoRA/head tensor, nothing of the base model
        assert ROWS not in value.shape and int(ROWS * 0.8) not in value.shape, (name, value.shape)
        if not compressed:
            assert value.shape == adapter[name].shape and value.dtype == np.float32, name
        else:
            assert value.dtype in (np.float16, np.float32, np.int8, np.uint8), (name, value.dtype)
            assert value.size <= adapter[base].size, name
    if not compressed:
        assert set(arrays) == set(adapter)
    assert all(("lora_" in n or "score" in n) for n in arrays)


@pytest.mark.parametrize("codec", ["none", "int8"])
def test_train_reply_holds_only_adapter_tensors_counts_and_privacy_figures(site, codec):
    path, texts, adapter, token_ids = site
    reply = client_app.app(deliver("train", adapter, job_config(codec)), context(path))
    assert not reply.has_error()
    audit_records(reply, TRAIN_METRICS, arrays=True)
    audit_tensors(to_arrays(reply.content["arrays"]), adapter, compressed=codec != "none")
    metrics = reply.content["metrics"]
    assert 40 <= metrics["num-examples"] < ROWS  # the training split: validation records stay home
    assert 0 < metrics["epsilon"] <= 8.0 + 1e-6 and metrics["noise-multiplier"] > 0
    audit_wire(reply, texts, token_ids)


def test_fisher_and_validation_replies(site):
    path, texts, adapter, token_ids = site
    ctx = context(path)
    fisher = client_app.app(deliver("train.fisher", adapter, job_config()), ctx)
    audit_records(fisher, FISHER_METRICS, arrays=True)
    audit_tensors(to_arrays(fisher.content["arrays"]), adapter)
    audit_wire(fisher, texts, token_ids)
    validation = client_app.app(deliver("evaluate.validation", adapter, job_config()), ctx)
    # the site releases a noised `correct` (its default policy) with the noise it added, charged
    audit_records(validation, {"correct", "total", "noise-multiplier", "sample-rate", "steps", "delta"}, arrays=False)
    assert 0 < validation.content["metrics"]["total"] < ROWS
    audit_wire(validation, texts, token_ids)


def test_secagg_plus_cannot_wrap_this_strategy_or_these_replies(site):
    """Flower 1.41's SecAgg+ is legacy-only: the server workflow needs a LegacyContext (a
    `flwr.server.strategy.Strategy` with configure_fit/aggregate_fit), and the client mod reads
    the reply as a legacy FitRes (`fitres.parameters`), which the Message-API replies are not."""
    from flwr.compat.common import recorddict_compat
    from flwr.server.workflow import SecAggPlusWorkflow

    path, _, adapter, _ = site
    with pytest.raises(TypeError, match="LegacyContext"):
        SecAggPlusWorkflow(num_shares=3, reconstruction_threshold=2)(None, context(path))
    reply = client_app.app(deliver("train.fisher", adapter, job_config()), context(path))
    with pytest.raises(KeyError):
        recorddict_compat.recorddict_to_fitres(reply.content, keep_input=True)
