"""A LoRA-adapted sequence classifier with a frozen-prefix cache.

When LoRA adapts only the top N decoder layers, everything below them is frozen, so the hidden
states entering the first adapted layer are a fixed function of the text: they are computed once
per text (`encode`) and training/evaluation runs only the top layers. This keeps DP exact (the
per-sample gradients are those of the full model) and cuts the cost of every step.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedseek.config import LoraSettings
from fedseek.models.features import ProbeHead, decoder_of, pool, public_stats
from fedseek.models.loading import load_classifier, load_tokenizer
from fedseek.models.lora import apply_lora, first_adapted_layer


@dataclass
class EncodedTexts:
    """Per-example model inputs: token ids, or cached hidden states of the frozen prefix."""

    inputs: list[torch.Tensor]  # (length,) int64 ids or (length, hidden) float
    labels: torch.Tensor
    label_mask: torch.Tensor | None = None  # bool (num_labels,): task-incremental active labels
    # multi-layer pooling only: pooled states of the frozen prefix's layers (n, (first+1)*hidden),
    # and the cached features of every layer under the adapter with digest `features_digest`
    prefix_pooled: torch.Tensor | None = None
    features: torch.Tensor | None = None
    features_digest: str = ""

    def __len__(self) -> int:
        return len(self.inputs)


def left_pad(items: list[torch.Tensor], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad ids (with `pad_id`) or hidden states (with zeros) on `device`; the mask marks real tokens."""
    length = max(len(x) for x in items)
    mask = torch.zeros(len(items), length, dtype=torch.long, device=device)
    if items[0].dim() == 1:
        out = torch.full((len(items), length), pad_id, dtype=torch.long, device=device)
    else:
        out = torch.zeros(len(items), length, items[0].shape[-1], dtype=items[0].dtype, device=device)
    for row, x in enumerate(items):
        out[row, length - len(x):] = x
        mask[row, length - len(x):] = 1
    return out, mask


@contextmanager
def only_layers_from(decoder: nn.Module, first: int):
    layers = decoder.layers
    decoder.layers = nn.ModuleList(list(layers)[first:])
    try:
        yield
    finally:
        decoder.layers = layers


def pooled_logits(model: nn.Module, attention_mask: torch.Tensor, **inputs) -> torch.Tensor:
    """Classification logits of a (PEFT-wrapped) `*ForSequenceClassification` model from the mean
    of its final hidden states over real tokens. Mean pooling suits small causal LMs (whose last
    position is trained to predict the next document) and DP training far better than the stock
    last-token pooling; this function works on a model loaded with stock `PeftModel.from_pretrained`.
    """
    hidden = decoder_of(model)(attention_mask=attention_mask, **inputs).last_hidden_state
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    return _head(model)(pooled)


def _head(model: nn.Module) -> nn.Module:
    for name, module in model.named_modules():
        if name.endswith("score") and hasattr(module, "forward"):
            return module
    raise ValueError("model has no `score` classification head")


def default_device() -> str:
    """`FEDSEEK_DEVICE` if set, else the GPU Ray (or the host) made visible, else the CPU."""
    import os

    return os.environ.get("FEDSEEK_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


class AdapterClassifier:
    """Base model + LoRA adapter + head for one task, with batched inference and a prefix cache.
    `pooling`: "last" (head on the mean of the final hidden states) or "layers" (head on every
    layer's pooled states, standardized with public statistics and projected on the first
    `components` (0: all shipped) public principal directions: `fedseek.models.features`)."""

    score_metric = "accuracy"  # what evaluate()'s `accuracy` measures

    def __init__(self, base: str | None, num_labels: int, lora: LoraSettings, max_length: int = 64,
                 device: str | None = None, pooling: str = "last", components: int = 0):
        if pooling not in ("last", "layers"):
            raise ValueError(f"pooling {pooling!r} is not 'last' or 'layers'")
        self.tokenizer = load_tokenizer(base)
        model = load_classifier(base, num_labels, self.tokenizer.pad_token_id)
        self.pooling = pooling
        if pooling == "layers":
            mean, std, projection = public_stats(base, max_length)
            model.score = ProbeHead(mean, std, projection[:, :components or None], num_labels)
        self.first_adapted = first_adapted_layer(model, lora)
        self.device = torch.device(device or default_device())
        self.model = apply_lora(model, lora).to(self.device)
        self.decoder = decoder_of(self.model)
        self.max_length = max_length
        self.num_labels = num_labels

    # -- inputs -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, texts: list[str], labels, chunk: int = 256,
               active_labels: list[int] | None = None) -> EncodedTexts:
        """Tokenize (and, with a frozen prefix, run it once) for every text. With `active_labels`
        the head is masked to them (a task-incremental period's labels) in training and scoring."""
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        inputs = [torch.tensor(x, dtype=torch.long) for x in ids]
        label_mask = None
        if active_labels is not None:
            label_mask = torch.zeros(self.num_labels, dtype=torch.bool)
            label_mask[list(active_labels)] = True
        if self.pooling == "layers":
            return self._encode_layers(inputs, torch.as_tensor(np.asarray(labels), dtype=torch.long), label_mask, chunk)
        if self.first_adapted:
            cached: list[torch.Tensor] = [None] * len(inputs)  # type: ignore[list-item]
            was_training = self.model.training
            self.model.eval()
            for batch in self._length_sorted_chunks(inputs, np.arange(len(inputs)), chunk):
                padded, mask = self._pad([inputs[i].to(self.device) for i in batch])
                out = self.model.base_model.model.model(input_ids=padded, attention_mask=mask,
                                                        output_hidden_states=True)
                hidden = out.hidden_states[self.first_adapted]
                for row, i in enumerate(batch):
                    cached[i] = hidden[row, -len(inputs[i]):].clone()
            self.model.train(was_training)
            inputs = cached
        return EncodedTexts(inputs, torch.as_tensor(np.asarray(labels), dtype=torch.long), label_mask)

    def _encode_layers(self, ids: list[torch.Tensor], labels: torch.Tensor, mask, chunk: int) -> EncodedTexts:
        """One pass over all layers: the features under the current adapter, and with a frozen
        prefix its output states (inputs of the adapted layers) and its layers' pooled states."""
        first, digest = self.first_adapted, self.adapter_digest()
        inputs: list[torch.Tensor] = list(ids)
        features = torch.zeros(len(ids), 0)
        prefix = None
        was_training = self.model.training
        self.model.eval()
        for batch in self._length_sorted_chunks(ids, np.arange(len(ids)), chunk):
            padded, attention = self._pad([ids[i].to(self.device) for i in batch])
            hidden = self.decoder(input_ids=padded, attention_mask=attention, output_hidden_states=True).hidden_states
            pooled = pool(hidden, attention).float().cpu()
            if features.shape[1] == 0:
                features = torch.zeros(len(ids), pooled.shape[1])
                width = pooled.shape[1] // len(hidden)
                prefix = torch.zeros(len(ids), (first + 1) * width) if first else None
            features[torch.as_tensor(batch)] = pooled
            if first:
                prefix[torch.as_tensor(batch)] = pooled[:, :prefix.shape[1]]
                for row, i in enumerate(batch):
                    inputs[i] = hidden[first][row, -len(ids[i]):].clone()
        self.model.train(was_training)
        return EncodedTexts(inputs, labels, mask, prefix, features, digest)

    def adapter_digest(self) -> str:
        """Identifies the current LoRA weights (the features depend on them; the head does not)."""
        import hashlib

        digest = hashlib.sha256()
        for name, param in self.model.named_parameters():
            if "lora_" in name:
                digest.update(param.detach().cpu().numpy().tobytes())
        return digest.hexdigest()

    def _pad(self, items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return left_pad(items, self.tokenizer.pad_token_id, self.device)

    @staticmethod
    def _length_sorted_chunks(inputs, index: np.ndarray, chunk: int) -> list[np.ndarray]:
        order = index[np.argsort([len(inputs[i]) for i in index], kind="stable")]
        return [order[i:i + chunk] for i in range(0, len(order), chunk)]

    # -- forward ------------------------------------------------------------------------------
    def logits(self, data: EncodedTexts, index) -> torch.Tensor:
        """Logits for `data.inputs[index]`: the head applied to mean-pooled final hidden states
        (with multi-layer pooling: to every layer's pooled states, the adapted layers run live)."""
        padded, mask = self._pad([data.inputs[i] for i in index])
        if self.pooling == "layers":
            return self.head_logits(data, self._live_features(data, index, padded, mask))
        if not self.first_adapted:
            logits = pooled_logits(self.model, input_ids=padded, attention_mask=mask)
        else:
            with only_layers_from(self.decoder, self.first_adapted):
                logits = pooled_logits(self.model, inputs_embeds=padded, attention_mask=mask)
        if data.label_mask is not None:  # inactive labels can be neither predicted nor trained
            logits = logits.masked_fill(~data.label_mask.to(logits.device), -1e4)
        return logits

    def _live_features(self, data: EncodedTexts, index, padded, mask) -> torch.Tensor:
        if not self.first_adapted:
            return pool(self.decoder(input_ids=padded, attention_mask=mask, output_hidden_states=True).hidden_states, mask)
        with only_layers_from(self.decoder, self.first_adapted):
            hidden = self.decoder(inputs_embeds=padded, attention_mask=mask, output_hidden_states=True).hidden_states
        prefix = data.prefix_pooled[torch.as_tensor(np.asarray(index))].to(padded.device)
        return torch.cat([prefix, pool(hidden[1:], mask)], dim=-1)  # hidden[0] is the prefix's output

    def head_logits(self, data: EncodedTexts, features: torch.Tensor) -> torch.Tensor:
        """The head on multi-layer features (inactive labels masked)."""
        logits = _head(self.model)(features.to(self.device))
        if data.label_mask is not None:
            logits = logits.masked_fill(~data.label_mask.to(logits.device), -1e4)
        return logits

    @torch.no_grad()
    def probe_features(self, data: EncodedTexts, chunk: int = 256) -> torch.Tensor:
        """Every record's multi-layer features under the current adapter, cached on `data` until
        the LoRA weights change (a head-only phase reuses them at no forward cost)."""
        digest = self.adapter_digest()
        if data.features is None or data.features_digest != digest:
            was_training = self.model.training
            self.model.eval()
            features = None
            for batch in self._length_sorted_chunks(data.inputs, np.arange(len(data)), chunk):
                padded, mask = self._pad([data.inputs[i].to(self.device) for i in batch])
                live = self._live_features(data, batch, padded, mask).float().cpu()
                features = features if features is not None else torch.zeros(len(data), live.shape[1])
                features[torch.as_tensor(batch)] = live
            self.model.train(was_training)
            data.features, data.features_digest = features, digest
        return data.features

    def loss(self, data: EncodedTexts, index) -> torch.Tensor:
        """Mean cross-entropy of the records `index` (the training objective)."""
        logits = self.logits(data, index)
        return nn.functional.cross_entropy(logits, data.labels[index].to(logits.device))

    def public_probe(self) -> EncodedTexts:
        """Two fixed public records (no institution data): the per-sample-gradient check's batch."""
        return self.encode(["public probe text", "another public probe"], [0, 0])

    def chunks(self, inputs, index: np.ndarray, chunk: int) -> list[np.ndarray]:
        return self._length_sorted_chunks(inputs, index, chunk)

    def evaluation_samples(self, data: EncodedTexts, count: int = 8) -> list[dict[str, str]]:
        """Classification shows no generation samples."""
        return []

    @torch.no_grad()
    def evaluate(self, data: EncodedTexts, chunk: int = 256) -> dict[str, float]:
        """Accuracy and mean cross-entropy over all of `data`."""
        was_training = self.model.training
        self.model.eval()
        correct, loss_sum = 0, 0.0
        features = self.probe_features(data) if self.pooling == "layers" else None
        for batch in self._length_sorted_chunks(data.inputs, np.arange(len(data)), chunk):
            logits = self.logits(data, batch) if features is None else self.head_logits(data, features[batch])
            labels = data.labels[batch].to(logits.device)
            loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(-1) == labels).sum())
        self.model.train(was_training)
        return {"accuracy": correct / len(data), "loss": loss_sum / len(data)}
