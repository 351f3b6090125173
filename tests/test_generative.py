"""The causal-lm objective: response-only loss, one record = one DP unit whatever its length, adapters
that generate with stock transformers + PEFT, (prompt, response) files with file:line errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.optimizers import DPOptimizer

from fedseek.clients.dp_trainer import LocalTrainer
from fedseek.config import LoraSettings
from fedseek.data.loader import DataError, read_labelled_file
from fedseek.models.generator import AdapterGenerator, normalize_answer, rouge_l

PROMPTS = ["How do I top up my account?", "My card has not arrived yet, it has been two weeks and I am "
           "still waiting for it to arrive at my home address, what should I do now?", "Exchange rate?"]
ANSWERS = ["top up", "card arrival and a much longer answer that runs over many more tokens than the first one",
           "exchange rate"]


def generator(top_layers: int = 1, seed: int = 0) -> AdapterGenerator:
    return AdapterGenerator(None, LoraSettings(top_layers=top_layers, seed=seed, extra_trainable=[]), 96,
                            max_new_tokens=32)


def perturb_adapter(model: AdapterGenerator, seed: int = 1) -> None:
    """LoRA B starts at zero (the adapter is a no-op); give it weights so that it changes outputs."""
    generator_ = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator_) * 0.5)


def test_prompt_tokens_carry_no_loss():
    """FedSeek's loss of a record equals transformers' own causal-LM loss with every prompt
    position labelled -100, and differs from the loss over all tokens."""
    model = generator(top_layers=0)
    perturb_adapter(model)
    data = model.encode(PROMPTS[:1], ANSWERS[:1])
    ids = data.inputs[0].unsqueeze(0)
    labels = ids.clone()
    labels[0, :data.prompt_lengths[0]] = -100
    model.model.eval()
    with torch.no_grad():
        ours = model.loss(data, [0]).item()
        response_only = model.model(input_ids=ids, labels=labels).loss.item()
        every_token = model.model(input_ids=ids, labels=ids).loss.item()
    assert ours == pytest.approx(response_only, rel=1e-4)
    assert abs(ours - every_token) > 0.1
    assert model.token_losses(data, [0])[1].item() == len(data.inputs[0]) - data.prompt_lengths[0]


def test_the_frozen_prefix_cache_gives_the_full_models_loss():
    cached, full = generator(top_layers=1), generator(top_layers=0)
    a, b = cached.encode(PROMPTS, ANSWERS), full.encode(PROMPTS, ANSWERS)
    assert a.inputs[0].dim() == 2 and b.inputs[0].dim() == 1  # hidden states vs ids
    with torch.no_grad():
        assert cached.loss(a, [0, 1, 2]).item() == pytest.approx(full.loss(b, [0, 1, 2]).item(), rel=1e-4)


def test_each_record_is_one_dp_unit_whatever_its_length():
    """Opacus's per-sample gradient of a record in a batch is the gradient of that record's own loss
    alone (its whole sequence, not per token), and after clipping its norm is at most C, for a
    short and a long record alike."""
    model = generator()
    trainer = LocalTrainer(model)
    data = model.encode(PROMPTS, ANSWERS)
    lengths = [len(x) for x in data.inputs]
    assert max(lengths) > 2 * min(lengths)
    trainer.private_module.enable_hooks()
    model.model.train()
    model.loss(data, [0, 1, 2]).backward()
    per_sample = {n: p.grad_sample.clone() for n, p in trainer.named_params.items()}
    for p in trainer.params:
        p.grad_sample, p.grad = None, None
    trainer.private_module.disable_hooks()
    clip = 1e-3  # far below every record's gradient norm: clipping is active for each
    for i in range(3):
        model.loss(data, [i]).backward()
        for name, param in trainer.named_params.items():
            torch.testing.assert_close(per_sample[name][i], param.grad, rtol=1e-3, atol=1e-6)
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in trainer.params))
        assert norm > clip
        for p in trainer.params:
            p.grad = None
    trainer.private_module.enable_hooks()
    for i in range(3):  # one record per logical batch, no noise: the update is the clipped gradient
        optimizer = DPOptimizer(torch.optim.SGD(trainer.params, lr=0.0), noise_multiplier=0.0, max_grad_norm=clip,
                                expected_batch_size=1)
        model.loss(data, [i]).backward()
        optimizer.step()
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in trainer.params))
        assert norm <= clip * (1 + 1e-4)
        assert norm >= clip * (1 - 1e-3)  # clipped to C, not zeroed
        optimizer.zero_grad(set_to_none=True)


def test_adapter_generates_the_same_text_with_stock_transformers_and_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedseek.models.loading import EMBEDDED_MODEL

    model = generator()
    perturb_adapter(model, seed=3)
    ours = model.generate(PROMPTS)
    base_answers = generator().generate(PROMPTS)
    assert ours != base_answers  # the adapter changes what the model says
    model.model.save_pretrained(tmp_path / "adapter")
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL, dtype=torch.float32),
                                      tmp_path / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    for prompt, answer in zip(PROMPTS, ours):
        text = f"### Instruction:\n{prompt}\n\n### Response:\n"  # the documented template (no chat template)
        ids = tokenizer(text, return_tensors="pt")
        out = stock.generate(**ids, max_new_tokens=32, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        assert tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip() == answer


def test_exact_match_and_rouge_l_scores():
    assert normalize_answer("Card_arrival.") == normalize_answer(" card   arrival ")
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    assert rouge_l(["dogs bark"], ["the cat sat on the mat"]) == 0.0
    model = generator()
    data = model.encode(PROMPTS, ANSWERS)
    result = model.evaluate(data)
    assert set(result) >= {"perplexity", "exact_match", "rouge_l", "accuracy", "loss"}
    assert result["perplexity"] == pytest.approx(np.exp(
        sum(model.token_losses(data, [i])[0].item() for i in range(3)) /
        sum(model.token_losses(data, [i])[1].item() for i in range(3))), rel=1e-4)
    samples = model.evaluation_samples(data, 2)
    assert [s["reference"] for s in samples] == ANSWERS[:2] and all("generated" in s for s in samples)


def test_pairs_files_are_read_with_clear_errors(tmp_path):
    good = tmp_path / "pairs.csv"
    good.write_text("question,answer,site\nWhat is 2+2?,four,a\nName a colour,blue,b\n")
    rows = read_labelled_file(good, "question", "label", response_column="answer")
    assert rows.texts == ["What is 2+2?", "Name a colour"] and rows.responses == ["four", "blue"]
    assert rows.label_names == ["all"]  # no label column: one class
    with pytest.raises(DataError, match=r"column 'reply' \(--response-column\) not found"):
        read_labelled_file(good, "question", "label", response_column="reply")
    with pytest.raises(DataError, match=r"column 'prompt' \(--prompt-column\) not found"):
        read_labelled_file(good, "prompt", "label", response_column="answer")
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"q": "hello", "a": "hi"}\n{"q": "bye", "a": "  "}\n')
    with pytest.raises(DataError, match=r"empty.jsonl:2: empty 'a'"):
        read_labelled_file(empty, "q", "label", response_column="a")


def test_shipped_generative_tasks_share_their_classification_twins_records():
    from fedseek.data.tasks import load_federated_data

    gen, cls = load_federated_data("banking77-gen"), load_federated_data("banking77")
    assert [len(t) for t in gen.train] == [len(t) for t in cls.train] and len(gen.test) == len(cls.test)
    assert gen.test.responses[0] == cls.label_names[cls.test.labels[0]].replace("_", " ")
    qa = load_federated_data("pubmedqa-gen")
    assert all(r and p.startswith("Question: ") for p, r in zip(qa.test.texts, qa.test.responses))
    assert qa.train[0].periods is not None  # publication years: the continual-learning periods


def test_a_quantized_base_is_refused_without_a_gpu():
    from fedseek.models.loading import ModelLoadError, load_causal_lm

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal is for CPU-only machines")
    with pytest.raises(ModelLoadError, match="needs a CUDA GPU"):
        load_causal_lm(None, "fp32", "4bit")


def test_lora_on_routed_experts_is_refused_under_dp_and_trains_without():
    """`attention+mlp` on DeepSeek-V3 puts LoRA on the fused 3-D routed-expert parameters (PEFT's
    parameter targeting), which Opacus has no per-sample rule for: a DP job is refused before any
    record is sampled; without DP the same adapter trains."""
    from fedseek.config import OptimSettings, PrivacySettings
    from fedseek.models.lora import LoraTargetError

    model = AdapterGenerator(None, LoraSettings(targets="attention+mlp", extra_trainable=[]), 96, max_new_tokens=16)
    assert any("experts" in n for n, p in model.model.named_parameters() if p.requires_grad and "lora" in n)
    trainer = LocalTrainer(model)
    with pytest.raises(LoraTargetError, match="routed experts"):
        trainer.check_dp()
    data = model.encode(PROMPTS, ANSWERS)
    before = {n: p.detach().clone() for n, p in trainer.named_params.items()}
    optim = OptimSettings(local_steps=2, batch_fraction=1.0, learning_rate=1e-2)
    trainer.train_round(data, PrivacySettings(enabled=False), optim, 1, 1, [], seed=0)
    changed = [n for n, p in trainer.named_params.items() if not torch.equal(p.detach(), before[n])]
    assert any("experts" in n for n in changed)


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3", "qwen2", "llama"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_local_checkpoints_train_under_dp_and_generate(tiny_checkpoints, arch, dtype):
    """The same code on DeepSeek-V2/V3 and R1-Distill-shaped (Qwen2, Llama) checkpoints saved to disk,
    in fp32 and bf16: a DP round moves the adapter, its clipped noisy update is finite, and it
    generates; a chat template, when the checkpoint has one, formats the prompt."""
    from fedseek.config import OptimSettings, PrivacySettings

    model = AdapterGenerator(tiny_checkpoints[arch], LoraSettings(rank=2, extra_trainable=[]), 48, dtype=dtype,
                             max_new_tokens=8)
    frozen = [p.dtype for p in model.model.parameters() if not p.requires_grad]
    assert set(frozen) == {torch.bfloat16 if dtype == "bf16" else torch.float32}  # PEFT keeps LoRA weights fp32
    trainer = LocalTrainer(model)
    trainer.check_dp()
    data = model.encode(["my card has not arrived yet"] * 4 + ["the tumour was removed"] * 4,
                        ["card arrival"] * 4 + ["surgery"] * 4)
    before = {n: p.detach().clone() for n, p in trainer.named_params.items()}
    result = trainer.train_round(data, PrivacySettings(target_epsilon=8.0), OptimSettings(local_steps=2,
                                 batch_fraction=0.5, learning_rate=1e-2), 1, 1, [], seed=0)
    assert result.epsilon <= 8.0 + 1e-6 and result.noise_multiplier > 0
    assert all(torch.isfinite(p).all() for p in trainer.params)
    assert any(not torch.equal(p.detach(), before[n]) for n, p in trainer.named_params.items())
    assert all(isinstance(a, str) for a in model.generate(["my card has not arrived yet"]))
    model.tokenizer.chat_template = "{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}<bot>"
    assert model.format_prompt("hello") == "<user>hello</user><bot>"
