"""The adapted model of a job: a LoRA classifier (`classify`) or a LoRA causal LM (`causal-lm`),
built from the job's settings in one place for the server, the institutions and the CLI."""
from __future__ import annotations

from typing import Union

import torch

from fedseek.config import JobConfig
from fedseek.data.loader import LabelledTexts
from fedseek.models.classifier import AdapterClassifier, EncodedTexts
from fedseek.models.generator import AdapterGenerator, EncodedPairs

AdaptedModel = Union[AdapterClassifier, AdapterGenerator]
EncodedRecords = Union[EncodedTexts, EncodedPairs]


def resolve_dtype(name: str) -> str:
    """`auto`: bf16 on a CUDA GPU that supports it, else fp32."""
    if name != "auto":
        return name
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def adapted_model(job: JobConfig, num_labels: int) -> AdaptedModel:
    """The job's base model with its LoRA adapter (and head, for classification)."""
    fed = job.federation
    if job.data.causal_lm:
        if job.recipe.name == "probe":
            raise ValueError("recipe.name: the probe recipe trains a classification head; causal-lm trains "
                             "LoRA (--recipe lora)")
        return AdapterGenerator(fed.base_model, job.lora, job.data.max_length, dtype=resolve_dtype(fed.dtype),
                                quantize=fed.quantize, max_new_tokens=job.data.response_tokens)
    if fed.quantize != "none":
        raise ValueError("federation.quantize: a quantized base is for the causal-lm objective (--objective causal-lm)")
    return AdapterClassifier(fed.base_model, num_labels, job.lora, job.data.max_length, pooling=job.recipe.pooling,
                             components=job.recipe.components)


def encode_rows(model: AdaptedModel, rows: LabelledTexts, active_labels: list[int] | None = None) -> EncodedRecords:
    """A split's records as the model reads them: (prompt, response) pairs or (text, label)."""
    if isinstance(model, AdapterGenerator):
        if rows.responses is None:
            raise ValueError(f"{rows.source}: the causal-lm objective needs a response per record "
                             "(--response-column)")
        return model.encode(rows.texts, rows.responses, rows.labels)
    return model.encode(rows.texts, rows.labels, active_labels=active_labels)
