"""The packed adapter format (`fedseek.wire.arrays`): one Flower object per record instead of one per
tensor and chunk, the same tensors after a real protobuf round trip, and malformed packed bytes — as
a malicious institution or coordinator could send them — refused with a named reason (by the
coordinator's strategy too: that reply is left out, the round goes on)."""
from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedseek.aggregator.strategy import AdapterFedAvg
from fedseek.wire.arrays import MAGIC, PACKED, WireFormatError, pack, to_arrays, to_record, to_tensors
from fedseek.wire.replies import TrainReply

RNG = np.random.default_rng(0)
ADAPTER = {f"layers.0.self_attn.{m}.lora_{ab}.weight": RNG.normal(size=(16, 8) if ab == "A" else (8, 16))
           .astype(np.float32) for m in ("q_a_proj", "q_b_proj", "kv_a_proj", "kv_b_proj", "o_proj") for ab in "AB"}
ADAPTER["score.modules_to_save.weight"] = RNG.normal(size=(77, 16)).astype(np.float32)


def over_the_wire(record: ArrayRecord) -> ArrayRecord:
    metadata = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=3, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=60, message_type="train")
    message = Message(RecordDict({"arrays": record}), metadata=metadata)
    return message_from_proto(message_to_proto(message)).content["arrays"]


def test_every_dtype_and_shape_survives_a_protobuf_round_trip():
    tensors = {**ADAPTER, "codes": np.arange(-7, 8, dtype=np.int8).reshape(3, 5), "mask": np.packbits([1, 0, 1]),
               "half": np.ones((2, 3), np.float16), "empty": np.zeros((0, 4), np.float32),
               "scalar": np.float32(3.5) * np.ones((), np.float32), "flags": np.array([True, False])}
    got = to_arrays(over_the_wire(to_record(tensors)))
    assert list(got) == list(tensors)
    for name, value in tensors.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value)
    torch_in = {k: torch.from_numpy(v) for k, v in ADAPTER.items()}
    for name, value in to_tensors(to_record(torch_in)).items():
        assert torch.equal(value, torch_in[name])


def test_a_packed_record_is_one_array_object_however_many_tensors():
    def objects(record: ArrayRecord) -> int:  # each is pushed and pulled with its own request
        return len(get_all_nested_objects(record))

    unpacked = ArrayRecord({k: Array(v) for k, v in ADAPTER.items()})  # Flower's own: an array and a chunk each
    assert objects(unpacked) == 1 + 2 * len(ADAPTER)
    assert objects(to_record(ADAPTER)) == 3  # the record, one array, its one chunk
    assert to_arrays(unpacked).keys() == ADAPTER.keys()  # Flower's format is still read


def corrupt(layout, data: bytes = b"", header: bytes = MAGIC) -> ArrayRecord:
    text = json.dumps(layout).encode()
    blob = header + len(text).to_bytes(4, "little") + text + data
    return ArrayRecord({PACKED: Array(np.frombuffer(blob, dtype=np.uint8))})


@pytest.mark.parametrize("record,words", [
    (corrupt([["a", "float32", [2]]], b"\0" * 8, header=b"PKL1"), "bad header"),
    (corrupt([["a", "float32", [4]]], b"\0" * 8), "runs past the data"),
    (corrupt([["a", "float32", [2**62, 2**62]]], b"\0" * 8), "runs past the data"),  # no overflow, no alloc
    (corrupt([["a", "float32", [-2]]], b"\0" * 8), "shape (-2,)"),
    (corrupt([["a", "object", [1]]], b"\0" * 8), "dtype object"),
    (corrupt([["a", "float32", [1]], ["a", "float32", [1]]], b"\0" * 8), "repeated"),
    (corrupt([["a", "float32", [1]]], b"\0" * 12), "8 trailing bytes"),
    (corrupt({"a": 1}), "unreadable layout"),
    (ArrayRecord({PACKED: Array(np.zeros(3, np.uint8)), "extra": Array(np.zeros(2, np.float32))}), "holds only"),
])
def test_malformed_packed_bytes_are_refused_with_the_reason(record, words):
    with pytest.raises(WireFormatError, match=re.escape(words)):
        to_arrays(over_the_wire(record))


def test_the_coordinator_leaves_a_reply_with_malformed_packed_tensors_out():
    s = AdapterFedAvg(3)
    s.sent = {k: v.copy() for k, v in ADAPTER.items()}

    def reply(node: int, arrays: ArrayRecord) -> Message:
        sent = Metadata(run_id=1, message_id=f"m{node}", src_node_id=0, dst_node_id=node, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=3600, message_type="train")
        content = TrainReply(num_examples=100, institution=f"bank_{node}", noise_multiplier=1.0, sample_rate=0.1,
                             steps=2, delta=1e-5, bytes_up=100).to_records(arrays)
        return Message(content, reply_to=Message(RecordDict({"config": ConfigRecord({})}), metadata=sent))

    shifted = {k: v + 0.5 for k, v in ADAPTER.items()}
    arrays, summary = s.aggregate_train(1, [reply(1, to_record(shifted)), reply(2, to_record(shifted)),
                                            reply(3, corrupt([["x", "float32", [10**9]]], b"\0" * 4))])
    log = {e["institution"]: e for e in s.round_log[1]}
    assert log["bank_3"]["rejected"].startswith("unreadable tensors: packed arrays: tensor 'x'"), log["bank_3"]
    assert summary["num-examples"] == 200
    for name, value in to_arrays(arrays).items():
        np.testing.assert_allclose(value, shifted[name], rtol=1e-6)
