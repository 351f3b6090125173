"""Tiny random checkpoints of every supported architecture, saved to disk like a real one.

Used by the tests (and by users checking a setup) to exercise the local-checkpoint path on
DeepSeek-V2, DeepSeek-V3, Qwen2 (R1-Distill-Qwen) and Llama (R1-Distill-Llama) without weights.
"""
from __future__ import annotations

from pathlib import Path

import torch

TINY_TEXT = [
    "my card has not arrived yet", "how do i top up my account", "the exchange rate was wrong",
    "patients with chronic pain were treated", "the tumour was removed by surgery",
    "i was charged twice for one payment", "blood pressure fell after treatment",
]


def tiny_config(arch: str, vocab_size: int):
    from transformers import DeepseekV2Config, DeepseekV3Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False)
    if arch in ("deepseek_v2", "deepseek_v3"):
        cls = DeepseekV3Config if arch == "deepseek_v3" else DeepseekV2Config
        common.update(num_key_value_heads=4, moe_intermediate_size=16, n_routed_experts=4,
                      num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                      n_group=1, topk_group=1)
        # V2's q_lora_rank=None exercises plain `q_proj`; V3 uses `q_a_proj`/`q_b_proj`
        common["q_lora_rank"] = 24 if arch == "deepseek_v3" else None
        return cls(**common)
    return {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch](**common)


def save_tiny_checkpoint(arch: str, directory: str | Path, seed: int = 0) -> Path:
    """Write a random `arch` causal LM and a small BPE tokenizer to `directory`."""
    from transformers import AutoModelForCausalLM

    from fedseek.models.pretrain import train_tokenizer

    directory = Path(directory)
    tokenizer = train_tokenizer(TINY_TEXT, vocab_size=300)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer)))
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
