"""Update compression: an institution uploads its adapter *delta* (trained minus the global adapter
it received) in a compact encoding; the coordinator decodes it before averaging. Pure numpy.

Codecs (`CompressionSettings.codec`):
  none  the full float32 tensors, as without compression (no delta, nothing lossy)
  fp16  the delta in half precision (2x fewer bytes)
  int8  symmetric int8 with one float32 scale per channel: the slices along the longer axis of a
        2-D tensor (one per LoRA rank row/column, one per head class), one scale for 1-D (~4x)
  int4  the same with 15 levels (-7..7), two codes packed per byte (~8x); meant with error feedback
`topk` (fraction f > 0) additionally keeps only the f largest-magnitude entries of each tensor,
their positions sent as a packed bitmask (1 bit per entry) and their values with the codec.
With `error_feedback` the client adds what the encoding dropped last round (its residual) to the
next delta, so the error does not accumulate. Compression acts on DP outputs only: it is
post-processing and costs no privacy.

A payload is a flat name -> array dict; the parts of a tensor carry the suffixes below.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedseek.config import CompressionSettings

Tensors = Mapping[str, np.ndarray]
LEVELS = {"int8": 127, "int4": 7}
SCALE, MASK = "#scale", "#mask"



def _quantize(values: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes in [-levels, levels] and float32 scales (one per channel of a 2-D tensor)."""
    x = np.asarray(values, dtype=np.float32)
    if x.ndim == 2:
        axis = 1 if x.shape[1] >= x.shape[0] else 0  # reduce along the longer axis
        peak = np.max(np.abs(x), axis=axis, keepdims=True)
    else:
        peak = np.max(np.abs(x), keepdims=True) if x.size else np.zeros(1, np.float32)
    scale = (peak / levels).astype(np.float32)  # keeps its broadcastable shape: (rows, 1) or (1, cols)
    codes = np.round(x / np.where(scale > 0, scale, 1.0))
    return np.clip(codes, -levels, levels).astype(np.int8), scale


def _pack_int4(codes: np.ndarray) -> np.ndarray:
    nibbles = (codes.reshape(-1).astype(np.int16) + 8).astype(np.uint8)
    nibbles = np.append(nibbles, np.uint8(8)) if nibbles.size % 2 else nibbles
    return nibbles[0::2] | (nibbles[1::2] << 4)


def _unpack_int4(packed: np.ndarray, shape: tuple) -> np.ndarray:
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=1).reshape(-1)
    return (nibbles[:int(np.prod(shape))].astype(np.int8) - 8).reshape(shape)


def _encode_values(name: str, values: np.ndarray, codec: str, payload: dict) -> None:
    if codec in LEVELS:
        codes, payload[name + SCALE] = _quantize(values, LEVELS[codec])
        payload[name] = _pack_int4(codes) if codec == "int4" else codes
    elif codec == "fp16":
        payload[name] = values.astype(np.float16)
    else:
        payload[name] = values.astype(np.float32)


def _decode_values(name: str, payload: Tensors, shape: tuple) -> np.ndarray:
    """The float32 values of `name` (of `shape`: the tensor's, or (k,) for top-k values)."""
    data = np.asarray(payload[name])
    if name + SCALE not in payload:
        return data.astype(np.float32).reshape(shape)
    codes = _unpack_int4(data, shape) if data.dtype == np.uint8 else data.reshape(shape)
    return codes.astype(np.float32) * np.asarray(payload[name + SCALE], dtype=np.float32)


def encode(delta: Tensors, settings: CompressionSettings) -> dict[str, np.ndarray]:
    """Encode each named delta tensor; `payload_bytes` of the result is what travels."""
    payload: dict[str, np.ndarray] = {}
    for name, value in delta.items():
        value = np.asarray(value, dtype=np.float32)
        if settings.topk > 0 and value.size:
            keep = max(1, int(np.ceil(settings.topk * value.size)))
            flat = value.reshape(-1)
            chosen = np.argpartition(np.abs(flat), flat.size - keep)[flat.size - keep:]
            mask = np.zeros(flat.size, dtype=bool)
            mask[chosen] = True
            payload[name + MASK] = np.packbits(mask)
            _encode_values(name, flat[mask], settings.codec, payload)
        else:
            _encode_values(name, value, settings.codec, payload)
    return payload


def decode(payload: Tensors, like: Tensors) -> dict[str, np.ndarray]:
    """The float32 delta tensors of `payload`; `like` (the global adapter) gives names and shapes."""
    out: dict[str, np.ndarray] = {}
    for name, reference in like.items():
        if name not in payload:
            raise KeyError(f"compressed update lacks tensor {name}")
        shape = tuple(np.shape(reference))
        if name + MASK in payload:
            size = int(np.prod(shape))
            mask = np.unpackbits(np.asarray(payload[name + MASK]), count=size).astype(bool)
            dense = np.zeros(size, dtype=np.float32)
            dense[mask] = _decode_values(name, payload, (int(mask.sum()),))
            out[name] = dense.reshape(shape)
        else:
            out[name] = _decode_values(name, payload, shape)
    return out


def compress(delta: Tensors, settings: CompressionSettings, residual: Tensors | None = None
             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(payload, new residual): encode delta (+ the previous residual, with error feedback)."""
    target = {k: np.asarray(v, dtype=np.float32) + (residual[k] if residual and settings.error_feedback
                                                    else 0.0) for k, v in delta.items()}
    payload = encode(target, settings)
    if not settings.error_feedback:
        return payload, {}
    sent = decode(payload, target)
    return payload, {k: target[k] - sent[k] for k in target}


def delta_between(trained: Tensors, received: Tensors) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float32) - np.asarray(received[k], np.float32) for k, v in trained.items()}


def apply_delta(reference: Tensors, delta: Tensors) -> dict[str, np.ndarray]:
    """reference + delta, in the reference's dtypes."""
    return {k: (np.asarray(v, np.float64) + delta[k]).astype(np.asarray(v).dtype) for k, v in reference.items()}


def payload_bytes(payload: Tensors) -> int:
    """Bytes of tensor data in an upload (what `bytes-up` reports)."""
    return int(sum(np.asarray(a).nbytes for a in payload.values()))
