"""A LoRA-adapted causal LM trained on (prompt, response) records: the `causal-lm` objective.

Each record is formatted with the checkpoint's chat template (or a plain instruction template when
it has none), tokenized as prompt + response + EOS, and trained with next-token cross-entropy on
the response tokens only: a record's loss is the mean over its own response tokens, a batch's the
mean over records, so one record is one DP unit (Opacus clips each record's whole-sequence
gradient). As for classification, the frozen layers below the adapted ones run once per record
(`encode`) and training runs only the adapted top layers. Evaluation: response perplexity, and
greedy `generate()` scored by exact match and ROUGE-L; `accuracy` (the score every report, chart
and continual-learning matrix reads) is exact match for short label-like answers, else ROUGE-L.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedseek.config import LoraSettings
from fedseek.models.classifier import only_layers_from, default_device, left_pad
from fedseek.models.features import decoder_of
from fedseek.models.loading import load_causal_lm, load_tokenizer
from fedseek.models.lora import apply_lora, first_adapted_layer

GENERATION_FILE = "generation.json"  # saved beside a causal-lm adapter
PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"  # checkpoints without a chat template
SHORT_ANSWER_WORDS = 4  # references this short (median) are labels: scored by exact match, else ROUGE-L
TOKENS_PER_CHUNK = 16384  # physical chunk size in tokens: bounds activation memory, not the math


@dataclass
class EncodedPairs:
    """Per-record model inputs: `inputs` token ids or cached prefix states of prompt + response +
    EOS, `prompt_lengths` how many of them are prompt; prompts/responses kept for generation."""

    inputs: list[torch.Tensor]
    ids: list[torch.Tensor]  # the token ids of prompt + response + EOS (the targets)
    prompt_lengths: list[int]
    prompt_ids: list[list[int]]
    prompts: list[str]
    responses: list[str]
    labels: torch.Tensor  # the record's class (partitioning, validation stratification), not trained
    label_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.inputs)


def normalize_answer(text: str) -> str:
    """Lower-case, single spaces, no surrounding punctuation: what exact match compares."""
    return re.sub(r"\s+", " ", text.lower().replace("_", " ")).strip(" .,:;!?\"'")


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure (Google's `rouge-score`, Porter stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]))


class AdapterGenerator:
    """Base causal LM + LoRA adapter with a frozen-prefix cache; the counterpart of
    `AdapterClassifier` for the causal-lm objective (same trainer, aggregator and platform)."""

    pooling = "last"  # no probe phase: every round trains LoRA

    def __init__(self, base: str | None, lora: LoraSettings, max_length: int = 256, device: str | None = None,
                 dtype: str = "fp32", quantize: str = "none", max_new_tokens: int = 32):
        self.tokenizer = load_tokenizer(base)
        model = load_causal_lm(base, dtype, quantize)
        self.first_adapted = first_adapted_layer(model, lora)
        self.device = torch.device(device or default_device())
        self.model = apply_lora(model, lora, causal_lm=True).to(self.device)
        self.decoder = decoder_of(self.model)
        self.max_length, self.max_new_tokens = max_length, max_new_tokens
        self.num_labels = 0
        self.last_answers: list[str] = []  # of the last `evaluate`, for `evaluation_samples`
        self.score_metric = "exact_match"  # `accuracy` of evaluate(): exact match, or ROUGE-L for text answers

    @classmethod
    def from_adapter(cls, adapter_dir: str | Path, base: str | None = None, device: str | None = None):
        """A saved causal-lm adapter (PEFT format + `generation.json`) on `base` (default: the base
        recorded in its adapter_config.json if that directory exists here, else the embedded one)."""
        from peft import PeftModel

        adapter_dir = Path(adapter_dir)
        settings = json.loads((adapter_dir / GENERATION_FILE).read_text())
        recorded = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
        base = base or (recorded if recorded and Path(recorded, "config.json").is_file() else None)
        self = cls.__new__(cls)
        self.tokenizer = load_tokenizer(base)
        model = load_causal_lm(base)  # fp32: generation.json records no dtype
        self.first_adapted, self.device = 0, torch.device(device or default_device())
        self.model = PeftModel.from_pretrained(model, adapter_dir).to(self.device).eval()
        self.decoder = decoder_of(self.model)
        self.max_length, self.max_new_tokens = settings["max_length"], settings["max_new_tokens"]
        self.num_labels, self.last_answers, self.score_metric = 0, [], settings.get("score_metric", "exact_match")
        self.base = base
        return self

    def save_settings(self, adapter_dir: str | Path) -> None:
        """`generation.json` beside the adapter: how prompts are cut and answers generated."""
        Path(adapter_dir, GENERATION_FILE).write_text(json.dumps({
            "max_length": self.max_length, "max_new_tokens": self.max_new_tokens, "score_metric": self.score_metric,
            "template": "chat" if getattr(self.tokenizer, "chat_template", None) else PLAIN_TEMPLATE}, indent=2))

    # -- inputs -------------------------------------------------------------------------------
    def format_prompt(self, prompt: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        return PLAIN_TEMPLATE.format(prompt=prompt)

    def prompt_ids(self, prompt: str) -> list[int]:
        """The formatted prompt's ids, its text cut (from the end) to leave `max_new_tokens` for the
        answer: the same ids in training and generation, whatever the reference answer's length."""
        budget = max(8, self.max_length - self.max_new_tokens)
        text_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(text_ids) > budget:
            template = len(self.tokenizer(self.format_prompt(""))["input_ids"])
            prompt = self.tokenizer.decode(text_ids[:max(1, budget - template)])
        return self.tokenizer(self.format_prompt(prompt))["input_ids"][: budget]

    @torch.no_grad()
    def encode(self, prompts: list[str], responses: list[str], labels=None, chunk: int = 256,
               active_labels=None) -> EncodedPairs:
        """Tokenize every (prompt, response) record (the response capped at `max_new_tokens` - 1
        tokens + EOS, the prompt cut to fit `max_length`) and, with a frozen prefix, run the frozen
        layers once per record."""
        eos = self.tokenizer.eos_token_id
        ids, prompt_ids, lengths = [], [], []
        for prompt, response in zip(prompts, responses):
            answer = self._answer_ids(response)
            head = self.prompt_ids(prompt)
            prompt_ids.append(head)
            lengths.append(len(head))
            ids.append(torch.tensor(head + answer + [eos], dtype=torch.long))
        labels = torch.as_tensor(np.zeros(len(ids)) if labels is None else np.asarray(labels), dtype=torch.long)
        inputs = ids
        if self.first_adapted:
            inputs = [None] * len(ids)
            was_training = self.model.training
            self.model.eval()
            for batch in self.chunks(ids, np.arange(len(ids)), chunk):
                padded, mask = self._pad([ids[i].to(self.device) for i in batch])
                hidden = self.decoder(input_ids=padded, attention_mask=mask,
                                      output_hidden_states=True).hidden_states[self.first_adapted]
                for row, i in enumerate(batch):
                    inputs[i] = hidden[row, -len(ids[i]):].clone()
            self.model.train(was_training)
        return EncodedPairs(inputs, ids, lengths, prompt_ids, list(prompts), list(responses), labels)

    def public_probe(self) -> EncodedPairs:
        """Two fixed public records (no institution data): the per-sample-gradient check's batch."""
        return self.encode(["public probe text", "another public probe"], ["an answer", "a longer public answer"])

    def _pad(self, items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return left_pad(items, self.tokenizer.pad_token_id, self.device)

    def chunks(self, inputs, index: np.ndarray, chunk: int) -> list[np.ndarray]:
        """Length-sorted physical chunks of at most `chunk` records and TOKENS_PER_CHUNK tokens."""
        order = index[np.argsort([len(inputs[i]) for i in index], kind="stable")]
        out, current, longest = [], [], 0
        for i in order:
            longest = max(longest, len(inputs[i]))
            if current and (len(current) >= chunk or longest * (len(current) + 1) > TOKENS_PER_CHUNK):
                out.append(np.array(current))
                current, longest = [], len(inputs[i])
            current.append(i)
        return out + ([np.array(current)] if current else [])

    # -- objective ----------------------------------------------------------------------------
    def token_losses(self, data: EncodedPairs, index) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed response-token NLL, response-token count) per record of `data.inputs[index]`;
        prompt and padding positions carry no loss."""
        index = list(index)
        padded, mask = self._pad([data.inputs[i] for i in index])
        if self.first_adapted:
            with only_layers_from(self.decoder, self.first_adapted):
                hidden = self.decoder(inputs_embeds=padded, attention_mask=mask).last_hidden_state
        else:
            hidden = self.decoder(input_ids=padded, attention_mask=mask).last_hidden_state
        ids = self._pad([data.ids[i].to(self.device) for i in index])[0]
        width = ids.shape[1]
        rows, cols, targets = [], [], []
        for row, i in enumerate(index):
            length, start = len(data.inputs[i]), width - len(data.inputs[i])
            positions = torch.arange(start + data.prompt_lengths[i] - 1, start + length - 1, device=self.device)
            rows.append(torch.full_like(positions, row))
            cols.append(positions)
            targets.append(ids[row, positions + 1])
        rows, cols, targets = torch.cat(rows), torch.cat(cols), torch.cat(targets)
        logits = self.model.get_output_embeddings()(hidden[rows, cols]).float()
        nll = nn.functional.cross_entropy(logits, targets, reduction="none")
        sums = torch.zeros(len(index), device=nll.device, dtype=nll.dtype).index_add(0, rows, nll)
        counts = torch.bincount(rows, minlength=len(index)).to(nll.dtype)
        return sums, counts

    def _answer_ids(self, response: str) -> list[int]:
        return self.tokenizer(response, add_special_tokens=False)["input_ids"][: self.max_new_tokens - 1]

    def loss(self, data: EncodedPairs, index) -> torch.Tensor:
        """Mean over the records of each record's mean response-token cross-entropy."""
        sums, counts = self.token_losses(data, index)
        return (sums / counts.clamp(min=1)).mean()

    # -- evaluation ---------------------------------------------------------------------------
    def generate(self, prompts: list[str]) -> list[str]:
        """Greedy answers of the adapted model to prompt texts (formatted and cut as in training)."""
        return self.generate_ids([self.prompt_ids(p) for p in prompts])

    @torch.no_grad()
    def generate_ids(self, prompt_ids: list[list[int]], batch: int = 32) -> list[str]:
        """Greedy answers (stock `generate()`, KV cache, left padding) to formatted prompt ids."""
        was_training = self.model.training
        self.model.eval()
        answers = []
        for start in range(0, len(prompt_ids), batch):
            ids = [torch.tensor(x, dtype=torch.long) for x in prompt_ids[start:start + batch]]
            padded, mask = self._pad([x.to(self.device) for x in ids])
            out = self.model.generate(input_ids=padded, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                      do_sample=False, use_cache=True, pad_token_id=self.tokenizer.pad_token_id,
                                      eos_token_id=self.tokenizer.eos_token_id)
            answers += [self.tokenizer.decode(row[padded.shape[1]:], skip_special_tokens=True).strip() for row in out]
        self.model.train(was_training)
        return answers

    @torch.no_grad()
    def evaluate(self, data: EncodedPairs, generate: bool = True) -> dict[str, float]:
        """Response perplexity (and mean record loss) over all of `data`; with `generate`, greedy
        answers scored by exact match and ROUGE-L against the responses (`accuracy`: exact match)."""
        was_training = self.model.training
        self.model.eval()
        total, tokens, per_record = 0.0, 0.0, []
        for batch in self.chunks(data.inputs, np.arange(len(data)), 256):
            sums, counts = self.token_losses(data, batch)
            total, tokens = total + float(sums.sum()), tokens + float(counts.sum())
            per_record += (sums / counts.clamp(min=1)).tolist()
        self.model.train(was_training)
        result = {"loss": float(np.mean(per_record)), "perplexity": float(np.exp(total / max(tokens, 1.0)))}
        if generate:
            answers = self.last_answers = self.generate_ids(data.prompt_ids)
            result["exact_match"] = float(np.mean([normalize_answer(a) == normalize_answer(r)
                                                   for a, r in zip(answers, data.responses)]))
            result["rouge_l"] = rouge_l(answers, data.responses)
            short = np.median([len(r.split()) for r in data.responses]) <= SHORT_ANSWER_WORDS
            self.score_metric = "exact_match" if short else "rouge_l"
            result["accuracy"] = result[self.score_metric]
        return result

    def evaluation_samples(self, data: EncodedPairs, count: int = 8) -> list[dict[str, str]]:
        """The first `count` records of the last evaluated `data`: prompt, reference and the
        adapted model's answer (what the admin reads beside the numbers)."""
        return [{"prompt": p, "reference": r, "generated": a}
                for p, r, a in list(zip(data.prompts, data.responses, self.last_answers))[:count]]
