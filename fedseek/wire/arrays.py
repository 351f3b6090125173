"""Adapter tensors <-> Flower `ArrayRecord`, by Flower's own conversion (numpy buffers, no pickle:
a record from an untrusted party cannot run code when read)."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


def to_record(tensors: Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of `tensors` (torch tensors or numpy arrays; names kept, order kept)."""
    return ArrayRecord({k: Array(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
                        for k, v in tensors.items()})


def to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """name -> torch tensor of a received record (Flower's `to_torch_state_dict`)."""
    return dict(record.to_torch_state_dict())
