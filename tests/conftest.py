"""Shared fixtures: tiny random checkpoints of every supported architecture, saved to disk."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARCHITECTURES = ("deepseek_v2", "deepseek_v3", "qwen2", "llama")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, str]:
    from fedseek.models.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: str(save_tiny_checkpoint(arch, root / arch)) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def banking():
    from fedseek.data.tasks import load_federated_data

    return load_federated_data("banking77", institutions=3, seed=0)
