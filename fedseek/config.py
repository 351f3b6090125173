"""Job configuration: one dataclass per concern, flattened to `section.field` keys for Flower's
ConfigRecord / run config and rebuilt on the other side.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fedseek.aggregator.compression import CompressionSettings
from fedseek.clients.dp_trainer import OptimSettings, PrivacySettings
from fedseek.models.lora import LoraSettings


@dataclass
class DataSettings:
    """Where each institution's records come from and how they are split."""

    task: str = "banking77"  # shipped task, used when neither `data` nor `data_dir` is given
    data: str | None = None  # one CSV/JSONL file partitioned across institutions
    data_dir: str | None = None  # one file per institution (+ optional test.*)
    test_data: str | None = None  # global test file for `data` (else a stratified hold-out)
    text_column: str = "text"
    label_column: str = "label"
    partition: str = "iid"  # iid | dirichlet
    alpha: float = 0.5  # Dirichlet concentration (smaller = more non-IID)
    max_length: int = 64  # tokens per record
    max_train_rows: int = 0  # cap on the pooled training rows (0 = all); for quick runs


@dataclass
class FederationSettings:
    """The federated job as a whole."""

    institutions: int = 3
    rounds: int = 5
    seed: int = 0
    base_model: str | None = None  # local checkpoint directory; None = embedded default
    out: str = "runs/latest"


@dataclass
class JobConfig:
    data: DataSettings = field(default_factory=DataSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)
    compression: CompressionSettings = field(default_factory=CompressionSettings)

    def to_flat(self) -> dict[str, Any]:
        """`section.field` -> value; None values are left out (ConfigRecord has no None)."""
        flat: dict[str, Any] = {}
        for section in dataclasses.fields(self):
            for key, value in dataclasses.asdict(getattr(self, section.name)).items():
                if value is not None:
                    flat[f"{section.name}.{key}"] = value
        return flat

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> "JobConfig":
        """Inverse of `to_flat`; unknown keys are ignored, missing keys keep their defaults."""
        job = cls()
        for section in dataclasses.fields(job):
            settings = getattr(job, section.name)
            for item in dataclasses.fields(settings):
                key = f"{section.name}.{item.name}"
                if key in flat:
                    value = flat[key]
                    setattr(settings, item.name, list(value) if isinstance(value, (list, tuple)) else value)
        return job


def data_arguments(job: JobConfig) -> dict:
    """Keyword arguments of `fedseek.data.tasks.load_federated_data` for this job: the server and
    every simulated institution derive the same split from them."""
    d = job.data
    return dict(task=d.task, institutions=job.federation.institutions, partition_scheme=d.partition,
                alpha=d.alpha, seed=job.federation.seed, data=d.data, data_dir=d.data_dir,
                test_data=d.test_data, text_column=d.text_column, label_column=d.label_column,
                max_train_rows=d.max_train_rows or None)
