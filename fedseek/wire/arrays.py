"""Adapter tensors <-> Flower `ArrayRecord`.

What FedSeek sends is *packed*: every tensor of a record in one uint8 `Array` (a short JSON
layout — name, dtype, shape of each tensor — then the raw bytes in that order). Flower moves each
`Array` and each of its chunks as a separate object, one authenticated request each: the default
adapter's 11 tensors are 23 objects unpacked and 3 packed (BENCHMARKS "Real deployment").
Records of named arrays, as Flower writes them, are read too. Neither format can run code
when read (no pickle); a malformed record raises `WireFormatError` naming what is wrong."""
from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

PACKED = "fedseek.packed"
MAGIC = b"FSK1"
DTYPES = frozenset({"float16", "float32", "float64", "int8", "uint8", "int32", "int64", "bool"})


class WireFormatError(ValueError):
    """A received record that does not decode to tensors."""


def pack(tensors: Mapping[str, np.ndarray]) -> bytes:
    """The packed bytes of `tensors` (names and order kept)."""
    arrays = {k: np.asarray(v, order="C") for k, v in tensors.items()}  # (ascontiguousarray makes 0-d 1-d)
    layout = json.dumps([[k, str(a.dtype), list(a.shape)] for k, a in arrays.items()]).encode()
    return b"".join([MAGIC, len(layout).to_bytes(4, "little"), layout, *(a.tobytes() for a in arrays.values())])


def unpack(blob: bytes) -> dict[str, np.ndarray]:
    """The tensors of packed bytes; every length and dtype is checked against the blob."""
    if blob[:4] != MAGIC or len(blob) < 8:
        raise WireFormatError("packed arrays: bad header")
    size = int.from_bytes(blob[4:8], "little")
    try:
        layout = json.loads(blob[8:8 + size].decode())
        entries = [(str(name), str(dtype), tuple(int(n) for n in shape)) for name, dtype, shape in layout]
    except (ValueError, TypeError) as err:
        raise WireFormatError(f"packed arrays: unreadable layout ({err})") from None
    out, offset = {}, 8 + size
    for name, dtype, shape in entries:
        if dtype not in DTYPES or any(n < 0 for n in shape):
            raise WireFormatError(f"packed arrays: tensor {name!r} has dtype {dtype} shape {shape}")
        count = math.prod(shape)  # Python ints: a huge claimed shape cannot overflow
        nbytes = count * np.dtype(dtype).itemsize
        if name in out or offset + nbytes > len(blob):
            raise WireFormatError(f"packed arrays: tensor {name!r} is repeated or runs past the data")
        out[name] = np.frombuffer(blob, dtype=dtype, count=count, offset=offset).reshape(shape).copy()
        offset += nbytes
    if offset != len(blob):
        raise WireFormatError(f"packed arrays: {len(blob) - offset} trailing bytes")
    return out


def to_record(tensors: Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    """A packed ArrayRecord of `tensors` (torch tensors or numpy arrays)."""
    arrays = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
              for k, v in tensors.items()}
    return ArrayRecord({PACKED: Array(np.frombuffer(pack(arrays), dtype=np.uint8))})


def to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """name -> numpy array of a received record, packed or Flower's named arrays."""
    try:
        if PACKED in record:
            if len(record) != 1:
                raise WireFormatError(f"a packed record holds only {PACKED!r}, got {sorted(record)}")
            return unpack(record[PACKED].numpy().tobytes())
        return {k: v.numpy() for k, v in record.items()}
    except WireFormatError:
        raise
    except Exception as err:  # noqa: BLE001 - anything Flower's deserializer raises on bad bytes
        raise WireFormatError(f"unreadable arrays: {err}") from None


def to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """name -> torch tensor of a received record."""
    return {k: torch.from_numpy(v) for k, v in to_arrays(record).items()}
