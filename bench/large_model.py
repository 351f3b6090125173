"""A ~100M-parameter random-init DeepSeek-V3 (MLA + MoE) checkpoint with the embedded tokenizer,
for benchmarks at a larger model size (no pretrained weights of that size ship offline)."""
from __future__ import annotations

from pathlib import Path

import torch


def hundred_million_config():
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=4096, hidden_size=768, intermediate_size=2048, moe_intermediate_size=512,
        num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=12, q_lora_rank=384,
        kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
        max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False,
        tie_word_embeddings=True)


def save_large_checkpoint(directory: str | Path, seed: int = 0) -> Path:
    """Write the random ~100M model (float32) + the embedded tokenizer to `directory` once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedseek.models.loading import EMBEDDED_MODEL

    directory = Path(directory)
    if (directory / "config.json").is_file():
        return directory
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hundred_million_config())
    model.save_pretrained(directory, safe_serialization=True)
    AutoTokenizer.from_pretrained(EMBEDDED_MODEL).save_pretrained(directory)
    return directory
