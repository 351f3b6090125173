"""Multi-layer pooled features for the classification head, standardized with PUBLIC statistics.

Every layer of the base carries information a classifier can use; the head reads the mean over
real tokens of each layer's hidden states (embedding output + every decoder layer), concatenated.
The features are standardized with a per-coordinate mean and std computed only on the public
pretraining slice (`fedseek.data.tasks.public_pretraining_texts`, disjoint from every institution
and test set) — never on institution records, so the normalization releases nothing about them.

The standardized features are then projected onto the top `COMPONENTS` principal directions of
the public features, whitened (also public-only): DP-SGD's noise is spread over every trainable
coordinate, so a head on 256 public directions instead of 1,280 raw coordinates gets five times
fewer noised coordinates for nearly the same signal (measured: BENCHMARKS.md, "DP recipe").

The statistics depend on the base and on the tokens read per record (`max_length`): those of the
embedded base at `SHIPPED_MAX_LENGTH` tokens are shipped beside its weights
(`public_feature_stats.safetensors`, written by `python -m fedseek.models.features`); any other
(base, max_length) is computed deterministically from the public text at first use and cached under
`~/.cache/fedseek/feature-stats/<base sha256>-<max_length>.safetensors`.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

STATS_FILE = "public_feature_stats.safetensors"
MIN_STD = 1e-4  # a coordinate the public text never moves is not amplified into noise
COMPONENTS = 256  # public principal directions the head reads
SHIPPED_MAX_LENGTH = 256  # tokens per record of the shipped statistics (the probe recipe's length)


def decoder_of(model: nn.Module) -> nn.Module:
    """The inner decoder (the module owning `layers` and `embed_tokens`)."""
    for module in model.modules():
        if isinstance(getattr(module, "layers", None), nn.ModuleList) and hasattr(module, "embed_tokens"):
            return module
    raise ValueError("model has no decoder with `layers` and `embed_tokens`")


def pool(hidden_states, attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, layers*hidden): each hidden-state tensor mean-pooled over real tokens, concatenated."""
    weights = attention_mask.unsqueeze(-1).to(hidden_states[0].dtype)
    count = weights.sum(1).clamp(min=1.0)
    return torch.cat([(h * weights).sum(1) / count for h in hidden_states], dim=-1)


class ProbeHead(nn.Module):
    """The classification head on multi-layer features: fixed public standardization and whitened
    public PCA projection (buffers, never trained or sent), then a zero-initialised linear layer."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, projection: torch.Tensor, num_labels: int):
        super().__init__()
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("std", std.float().clamp(min=MIN_STD).clone())
        self.register_buffer("projection", projection.float().clone())
        self.linear = nn.Linear(projection.shape[1], num_labels)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(((features - self.mean) / self.std) @ self.projection)


@torch.no_grad()
def texts_features(model: nn.Module, tokenizer, texts: list[str], max_length: int = 64,
                   chunk: int = 128) -> torch.Tensor:
    """Pooled multi-layer features of `texts` under `model` (a causal LM or classifier whose inner
    decoder has `layers` and `embed_tokens`), in input order."""
    decoder = decoder_of(model)
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    out: torch.Tensor | None = None
    order = np.argsort([len(x) for x in ids], kind="stable")
    for start in range(0, len(order), chunk):
        batch = order[start:start + chunk]
        length = max(len(ids[i]) for i in batch)
        padded = torch.full((len(batch), length), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(batch), length, dtype=torch.long)
        for row, i in enumerate(batch):
            padded[row, length - len(ids[i]):] = torch.tensor(ids[i])
            mask[row, length - len(ids[i]):] = 1
        device = next(decoder.parameters()).device
        hidden = decoder(input_ids=padded.to(device), attention_mask=mask.to(device),
                         output_hidden_states=True).hidden_states
        pooled = pool(hidden, mask.to(device)).float().cpu()
        if out is None:
            out = torch.zeros(len(ids), pooled.shape[-1])
        out[torch.as_tensor(batch)] = pooled
    return out


def stats_of(features: torch.Tensor, components: int = COMPONENTS) -> dict[str, torch.Tensor]:
    """mean, std and the whitened PCA projection (features x components) of public `features`."""
    mean, std = features.mean(0), features.std(0)
    z = (features - mean) / std.clamp(min=MIN_STD)
    _, singular, vh = torch.linalg.svd(z - z.mean(0), full_matrices=False)
    k = min(components, vh.shape[0])
    scale = (singular[:k] / max(len(z) - 1, 1) ** 0.5).clamp(min=MIN_STD)
    return {"mean": mean.contiguous(), "std": std.contiguous(), "projection": (vh[:k].T / scale).contiguous()}


def compute_public_stats(base: str | None, max_length: int = SHIPPED_MAX_LENGTH) -> dict[str, torch.Tensor]:
    """`stats_of` the multi-layer features over the public pretraining slice (deterministic)."""
    from fedseek.data.tasks import public_pretraining_texts
    from fedseek.models.loading import load_classifier, load_tokenizer

    tokenizer = load_tokenizer(base)
    model = load_classifier(base, 2, tokenizer.pad_token_id).eval()
    return stats_of(texts_features(model, tokenizer, public_pretraining_texts(), max_length))


def _cache_file(base: str | None, max_length: int) -> Path:
    from fedseek.models.loading import EMBEDDED_MODEL, base_model_hash, resolve_base

    path = resolve_base(base)
    if path == EMBEDDED_MODEL and max_length == SHIPPED_MAX_LENGTH:
        return path / STATS_FILE
    root = Path(os.environ.get("FEDSEEK_CACHE", Path.home() / ".cache" / "fedseek"))
    return root / "feature-stats" / f"{base_model_hash(base)[:16]}-{max_length}.safetensors"


@lru_cache(maxsize=4)
def public_stats(base: str | None, max_length: int = SHIPPED_MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, std, projection) of the base's public features at `max_length` tokens per record:
    shipped/cached file, else computed and cached."""
    from safetensors.torch import load_file, save_file

    path = _cache_file(base, max_length)
    if path.is_file():
        stats = load_file(str(path))
    else:
        stats = compute_public_stats(base, max_length)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(stats, str(path))
        except OSError:  # a read-only install: recompute next time
            pass
    return stats["mean"], stats["std"], stats["projection"]


if __name__ == "__main__":  # regenerate the shipped statistics of the embedded base
    from safetensors.torch import save_file

    from fedseek.models.loading import EMBEDDED_MODEL

    stats = compute_public_stats(None, SHIPPED_MAX_LENGTH)
    save_file(stats, str(EMBEDDED_MODEL / STATS_FILE))
    print(f"wrote {EMBEDDED_MODEL / STATS_FILE}: {tuple(stats['projection'].shape)} projection")
