"""Build the embedded default base model: a small DeepSeek-V3-architecture causal LM (MLA + MoE)
with its own byte-level BPE tokenizer, pretrained on the public slice of the shipped data
(`fedseek.data.tasks.public_pretraining_texts`), which no institution or test set contains.

    python -m fedseek.models.pretrain --out fedseek/models/embedded --minutes 25

Early-stops on held-out loss, keeps the best weights, saves them as fp16 safetensors and writes
MODEL_CARD.md with the held-out perplexity.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from fedseek.data.tasks import PUBLIC_FRACTION, public_pretraining_texts

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"]
BLOCK = 128


def embedded_config(vocab_size: int):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=96,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
        n_group=1, topk_group=1, routed_scaling_factor=1.0, max_position_embeddings=512,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False,
    )


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A <|eos|>", special_tokens=[("<|bos|>", 1), ("<|eos|>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>",
                                   eos_token="<|eos|>", unk_token="<|unk|>", padding_side="right")


def _blocks(token_lists: list[list[int]]) -> torch.Tensor:
    stream = np.concatenate([np.asarray(t, dtype=np.int64) for t in token_lists])
    usable = len(stream) // BLOCK * BLOCK
    return torch.from_numpy(stream[:usable].reshape(-1, BLOCK))


@torch.no_grad()
def _heldout_loss(model, blocks: torch.Tensor) -> float:
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in blocks.split(64)]
    model.train()
    return float(np.mean(losses))


def pretrain(out: Path, minutes: float, vocab_size: int = 4096, seed: int = 0,
             banking_repeats: int = 3) -> dict:
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    texts = public_pretraining_texts()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    held = set(order[: len(texts) // 20].tolist())
    train_texts = [t for i, t in enumerate(texts) if i not in held]
    held_texts = [t for i, t in enumerate(texts) if i in held]
    tokenizer = train_tokenizer(train_texts, vocab_size)
    encode = lambda xs: tokenizer(xs, add_special_tokens=True)["input_ids"]  # noqa: E731
    short = [t for t in train_texts if len(t) < 300]  # banking queries: the default task's domain
    train_ids = encode(train_texts) + encode(short) * (banking_repeats - 1)
    held_blocks = _blocks(encode(held_texts))
    config = embedded_config(len(tokenizer))
    config.attention_dropout = 0.1  # regularises pretraining only; fine-tuning runs without it
    model = DeepseekV3ForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    deadline, start = time.time() + minutes * 60, time.time()
    best, best_state, history, step, patience = math.inf, None, [], 0, 0
    model.train()
    while time.time() < deadline and patience < 3:
        shuffled = [train_ids[i] for i in rng.permutation(len(train_ids))]
        blocks = _blocks(shuffled)
        for batch in blocks[torch.randperm(len(blocks))].split(32):
            lr = 2e-3 * min(1.0, (step + 1) / 200)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 100 == 0 or time.time() > deadline:
                held_loss = _heldout_loss(model, held_blocks)
                history.append({"step": step, "train_loss": loss.item(), "heldout_loss": held_loss,
                                "minutes": round((time.time() - start) / 60, 2)})
                print(json.dumps(history[-1]), flush=True)
                if held_loss < best - 1e-3:
                    best, patience = held_loss, 0
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                else:
                    patience += 1
                if time.time() > deadline or patience >= 3:
                    break
    model.load_state_dict(best_state)
    model.config.attention_dropout = 0.0
    out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    stats = {"parameters": params, "vocab_size": len(tokenizer), "steps": step,
             "train_tokens": int(sum(map(len, train_ids))), "heldout_tokens": int(held_blocks.numel()),
             "heldout_loss": best, "heldout_perplexity": math.exp(best), "documents": len(texts),
             "minutes": round((time.time() - start) / 60, 1), "banking_repeats": banking_repeats,
             "history": history}
    (out / "pretraining.json").write_text(json.dumps(stats, indent=1))
    write_model_card(out, stats, config)
    return stats


def write_model_card(out: Path, stats: dict, config) -> None:
    (out / "MODEL_CARD.md").write_text(f"""# fedseek-tiny-v3 (embedded default base model)

A small **DeepSeek-V3-architecture** causal language model (`DeepseekV3ForCausalLM`, transformers
5.23): Multi-head Latent Attention (q_lora_rank {config.q_lora_rank}, kv_lora_rank
{config.kv_lora_rank}, {config.num_attention_heads} heads) and Mixture-of-Experts
({config.n_routed_experts} routed experts, top-{config.num_experts_per_tok}, {config.n_shared_experts} shared
expert, the first {config.first_k_dense_replace} layer dense); {config.num_hidden_layers} layers, hidden size
{config.hidden_size}, **{stats['parameters']:,} parameters**, tied embeddings, stored as fp16 safetensors.
Its byte-level BPE tokenizer ({stats['vocab_size']:,} tokens) was trained on the same text.

## How it was made
`python -m fedseek.models.pretrain` (this repository) on {date.today()}, on CPU:
- **Text**: the public slice of the shipped data, `fedseek.data.tasks.public_pretraining_texts()`:
  {int(PUBLIC_FRACTION * 100)} % of banking77's training queries (stratified, seed 0) and {int(PUBLIC_FRACTION * 100)} % of
  medical_abstracts (stratified, seed 0), minus any text that also occurs in an institution's split or a
  test set. No institution's records and no test record were seen. {stats['documents']:,} documents;
  5 % of them held out for early stopping.
- **Objective**: next-token prediction on {BLOCK}-token blocks; short banking queries repeated
  {stats.get('banking_repeats', 3)}x per epoch (the default task's domain); AdamW lr 2e-3, 200-step warmup,
  weight decay 0.1, attention dropout 0.1 (set to 0 in the saved config), gradient clipping 1.0.
- **Early stopping** on held-out loss (checked every 100 steps, patience 3); best weights kept.
- {stats['steps']:,} steps, {stats['minutes']} minutes; {stats['train_tokens']:,} training tokens per epoch.

## Result
Held-out loss **{stats['heldout_loss']:.3f}**, perplexity **{stats['heldout_perplexity']:.1f}** on
{stats['heldout_tokens']:,} held-out tokens. It is a tiny model trained on little text: it gives FedSeek
a base that has learned real language statistics of its domains, so that federated LoRA fine-tuning
can be demonstrated and tested on a laptop. For real work load a DeepSeek checkpoint with `--base-model`.

## Licence of the training text
banking77: CC BY 4.0 (Casanueva et al. 2020); medical_abstracts: CC BY-SA 3.0 (Schopf, Braun &
Matthes 2023). See `fedseek/data/shipped/*/LICENSE` and `SOURCE.txt`.
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "embedded")
    parser.add_argument("--minutes", type=float, default=25.0)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    stats = pretrain(args.out, args.minutes, args.vocab_size, args.seed)
    print(f"saved to {args.out} on {date.today()}: held-out perplexity {stats['heldout_perplexity']:.1f}")


if __name__ == "__main__":
    main()
