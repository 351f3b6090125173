"""Base-model loading and LoRA presets on tiny random checkpoints of every supported architecture."""
from __future__ import annotations

import json

import pytest
import torch

from fedseek.config import LoraSettings
from fedseek.models.classifier import AdapterClassifier
from fedseek.models.loading import ModelLoadError, load_classifier, load_tokenizer
from fedseek.models.lora import LoraTargetError, resolve_targets

EXPECTED = {
    "deepseek_v2": ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],  # q_lora_rank=None
    "deepseek_v3": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_presets_resolve_on_checkpoints_loaded_from_disk(tiny_checkpoints, arch):
    model = load_classifier(tiny_checkpoints[arch], num_labels=3)
    assert model.config.model_type == arch
    assert resolve_targets(model, "attention") == EXPECTED[arch]
    assert set(resolve_targets(model, "attention+mlp")) >= {"gate_proj", "up_proj", "down_proj"}
    classifier = AdapterClassifier(tiny_checkpoints[arch], 3, LoraSettings(rank=2))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1]
               for n, _ in classifier.model.named_parameters() if ".lora_A." in n}
    assert adapted == set(EXPECTED[arch])
    assert all("router" not in n and ".gate." not in n for n, p in classifier.model.named_parameters()
               if p.requires_grad)


def test_unknown_lora_target_fails_clearly(tiny_checkpoints):
    model = load_classifier(tiny_checkpoints["deepseek_v3"], num_labels=3)
    with pytest.raises(LoraTargetError, match=r"'query_key_value'.*match no linear layer.*kv_b_proj"):
        resolve_targets(model, "query_key_value")


def test_unsupported_or_missing_model_directory(tmp_path, tiny_checkpoints):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_classifier(str(tmp_path), 3)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="architecture 'gpt2' is not supported"):
        load_classifier(str(tmp_path), 3)


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen2"])
def test_frozen_prefix_cache_matches_full_forward(tiny_checkpoints, arch):
    texts = ["my card has not arrived", "blood pressure fell after the treatment was given", "hi"]
    cached = AdapterClassifier(tiny_checkpoints[arch], 3, LoraSettings(rank=2, top_layers=1))
    full = AdapterClassifier(tiny_checkpoints[arch], 3, LoraSettings(rank=2, top_layers=1))
    full.first_adapted = 0  # same adapter, but run every layer from token ids
    assert cached.first_adapted == 1
    adapted_layers = {int(n.split(".layers.")[1].split(".")[0])
                      for n, _ in cached.model.named_parameters() if ".lora_" in n}
    assert adapted_layers == {1}  # LoRA only above the cached, frozen prefix
    with torch.no_grad():
        for p in list(cached.model.parameters()):
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
        full.model.load_state_dict(cached.model.state_dict())
    a, b = cached.encode(texts, [0, 1, 2]), full.encode(texts, [0, 1, 2])
    assert a.inputs[0].dim() == 2 and b.inputs[0].dim() == 1
    cached.model.eval(), full.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(cached.logits(a, [0, 1, 2]), full.logits(b, [0, 1, 2]), atol=1e-4, rtol=1e-4)


def test_tokenizer_pads_left(tiny_checkpoints):
    tokenizer = load_tokenizer(tiny_checkpoints["llama"])
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
