"""Loading base models: the embedded default or a local checkpoint directory of DeepSeek-V2/V3
(MLA + MoE) or DeepSeek-R1-Distill (Qwen2/Llama), as a sequence classifier.

No model hub is contacted: `base` is a local directory (HF_HUB_OFFLINE is forced).
"""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import torch

from fedseek.resources import resource_path

EMBEDDED_MODEL = resource_path("models/embedded", "model.safetensors")
SUPPORTED_ARCHITECTURES = ("deepseek_v2", "deepseek_v3", "qwen2", "llama")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class ModelLoadError(ValueError):
    """The base-model directory is missing, incomplete or of an unsupported architecture."""


def resolve_base(base: str | None) -> Path:
    path = Path(base) if base else EMBEDDED_MODEL
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: not a model directory (no config.json); pass a local "
                             "checkpoint directory with --base-model")
    return path


def load_tokenizer(base: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_base(base))
    if tokenizer.pad_token is None:  # Qwen2/Llama checkpoints often ship without one
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "left"  # the last position is then always the pooled token
    return tokenizer


def load_classifier(base: str | None, num_labels: int, pad_token_id: int | None = None):
    """A float32 `AutoModelForSequenceClassification` on `base` with a zero-initialised head
    (a zero head is the better start under DP noise: DESIGN.md section 7)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_base(base)
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"{path}: architecture {config.model_type!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    config.num_labels = num_labels
    config.use_cache = False
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
    model = AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=torch.float32)
    with torch.no_grad():
        model.score.weight.zero_()
    return model


@lru_cache(maxsize=8)
def base_model_hash(base: str | None = None) -> str:
    """sha256 over the checkpoint's weight files: identifies the exact base of every adapter."""
    path = resolve_base(base)
    digest = hashlib.sha256()
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        with weights.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def base_model_bytes(base: str | None = None) -> int:
    path = resolve_base(base)
    return sum(p.stat().st_size for p in path.glob("*") if p.suffix in (".safetensors", ".bin"))
