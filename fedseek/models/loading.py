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
    from transformers import AutoModelForSequenceClassification

    path = resolve_base(base)
    config = _supported_config(path)
    config.num_labels = num_labels
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
    model = AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=torch.float32)
    with torch.no_grad():
        model.score.weight.zero_()
    return model


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _supported_config(path: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"{path}: architecture {config.model_type!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    config.use_cache = False
    return config


def load_causal_lm(base: str | None, dtype: str = "fp32", quantize: str = "none"):
    """`AutoModelForCausalLM` on `base` in `dtype` (fp32 | bf16), or with `quantize` 4bit | 8bit a
    bitsandbytes-quantized frozen base (QLoRA: CUDA only; a clear error elsewhere)."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ModelLoadError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    path = resolve_base(base)
    extra = {}
    if quantize != "none":
        extra["quantization_config"] = quantization_config(quantize, DTYPES[dtype])
    return AutoModelForCausalLM.from_pretrained(path, config=_supported_config(path), dtype=DTYPES[dtype], **extra)


def quantization_config(quantize: str, compute_dtype: torch.dtype):
    """bitsandbytes 4-bit (NF4, double quantization) or 8-bit config; refused without CUDA or the package."""
    if quantize not in ("4bit", "8bit"):
        raise ModelLoadError(f"--quantize {quantize!r}: choose 4bit, 8bit or none")
    if not torch.cuda.is_available():
        raise ModelLoadError(f"--quantize {quantize}: bitsandbytes quantization needs a CUDA GPU; this machine has "
                             "none (train the base in fp32/bf16 instead)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError(f"--quantize {quantize}: install bitsandbytes (pip install bitsandbytes)") from None
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


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
