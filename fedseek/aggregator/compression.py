"""Update compression: an institution uploads its adapter *delta* (trained minus the global adapter
it received) in a compact encoding; the coordinator decodes it before averaging. Pure numpy.

Codecs (`CompressionSettings.codec`):
  none  the full float32 tensors, as without compression (no delta, nothing lossy)
  fp16  the delta in half precision (2x fewer bytes)
  int8  symmetric int8 with one float32 scale per channel: the slices along the longer axis of a
        2-D tensor (one per LoRA rank row/column, one per head class), one scale for 1-D (~4x)
`topk` (fraction f > 0) additionally keeps only the f largest-magnitude entries of each tensor,
their positions sent as a packed bitmask (1 bit per entry) and their values with the codec.
With `error_feedback` the client adds what the encoding dropped last round (its residual) to the
next delta, so the error does not accumulate. Compression acts on DP outputs only: it is
post-processing and costs no privacy.

A payload is a flat name -> array dict; the parts of a tensor carry the suffixes below.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

Tensors = Mapping[str, np.ndarray]
CODECS = ("none", "fp16", "int8")
SCALE, MASK = "#scale", "#mask"


@dataclass
class CompressionSettings:
    """How institutions encode their adapter updates for upload."""

    codec: str = "none"  # none | fp16 | int8
    topk: float = 0.0  # keep this fraction of each tensor's delta entries (0 = all)
    error_feedback: bool = True  # carry the encoding error into the next round's delta

    @property
    def enabled(self) -> bool:
        """True when updates travel as encoded deltas (anything but plain float32 tensors)."""
        return self.codec != "none" or self.topk > 0

    def __post_init__(self):
        if self.codec not in CODECS:
            raise ValueError(f"unknown compression codec {self.codec!r}; choose one of {CODECS}")
        if not 0.0 <= self.topk < 1.0:
            raise ValueError(f"topk must be a fraction in [0, 1), got {self.topk}")


def _quantize_int8(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes and float32 scales (one per channel of a 2-D tensor, else one)."""
    x = np.asarray(values, dtype=np.float32)
    if x.ndim == 2:
        axis = 1 if x.shape[1] >= x.shape[0] else 0  # reduce along the longer axis
        peak = np.max(np.abs(x), axis=axis, keepdims=True)
    else:
        peak = np.max(np.abs(x), keepdims=True) if x.size else np.zeros(1, np.float32)
    scale = (peak / 127.0).astype(np.float32)  # keeps its broadcastable shape: (rows, 1) or (1, cols)
    codes = np.round(x / np.where(scale > 0, scale, 1.0))
    return np.clip(codes, -127, 127).astype(np.int8), scale


def _dequantize_int8(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * scale.astype(np.float32)


def _encode_values(name: str, values: np.ndarray, codec: str, payload: dict) -> None:
    if codec == "int8":
        payload[name], payload[name + SCALE] = _quantize_int8(values)
    elif codec == "fp16":
        payload[name] = values.astype(np.float16)
    else:
        payload[name] = values.astype(np.float32)


def _decode_values(name: str, payload: Tensors) -> np.ndarray:
    if name + SCALE in payload:
        return _dequantize_int8(np.asarray(payload[name]), np.asarray(payload[name + SCALE]))
    return np.asarray(payload[name], dtype=np.float32)


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
        shape = np.shape(reference)
        values = _decode_values(name, payload)
        if name + MASK in payload:
            size = int(np.prod(shape))
            mask = np.unpackbits(np.asarray(payload[name + MASK]), count=size).astype(bool)
            dense = np.zeros(size, dtype=np.float32)
            dense[mask] = values
            values = dense
        out[name] = values.reshape(shape)
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
