"""Architecture-aware LoRA targets (DESIGN.md section 4), validated against the loaded model.

Targets are linear-layer names. DeepSeek-V2/V3 attention is MLA (`q_a_proj`/`q_b_proj` or
`q_proj`, `kv_a_proj_with_mqa`, `kv_b_proj`, `o_proj`); their MLP names cover the dense MLP of
the first layers and the shared experts (routed experts are fused 3-D parameters in transformers
5.x, not linear layers, and the router `gate` is never adapted by default).
"""
from __future__ import annotations

import torch
from torch import nn

from fedseek.config import LoraSettings

MLA_ATTENTION = ["q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
GQA_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
PRESETS: dict[str, dict[str, list[str]]] = {
    "deepseek_v2": {"attention": MLA_ATTENTION, "attention+mlp": MLA_ATTENTION + MLP},
    "deepseek_v3": {"attention": MLA_ATTENTION, "attention+mlp": MLA_ATTENTION + MLP},
    "qwen2": {"attention": GQA_ATTENTION, "attention+mlp": GQA_ATTENTION + MLP},
    "llama": {"attention": GQA_ATTENTION, "attention+mlp": GQA_ATTENTION + MLP},
}


class LoraTargetError(ValueError):
    """A LoRA target does not name any linear layer of the loaded model."""



def linear_module_names(model: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def resolve_targets(model: nn.Module, targets: str) -> list[str]:
    """Module names to adapt. A preset keeps the names this architecture has; an explicit list
    must match exactly, each name at least one linear layer."""
    arch = model.config.model_type
    present = linear_module_names(model)
    if targets in ("attention", "attention+mlp"):
        if arch not in PRESETS:
            raise LoraTargetError(f"no LoRA preset for architecture {arch!r}; pass explicit targets "
                                  f"from its linear layers: {sorted(present)}")
        chosen = [t for t in PRESETS[arch][targets] if t in present]
        if not chosen:
            raise LoraTargetError(f"preset {targets!r} matches no linear layer of this {arch} model; "
                                  f"its linear layers are {sorted(present)}")
        return chosen
    requested = [t.strip() for t in targets.split(",") if t.strip()]
    missing = [t for t in requested if t not in present]
    if missing or not requested:
        raise LoraTargetError(f"LoRA target(s) {missing or targets!r} match no linear layer of this "
                              f"{arch} model; its linear layers are {sorted(present)}")
    return requested


def first_adapted_layer(model: nn.Module, settings: LoraSettings) -> int:
    """Index of the lowest decoder layer LoRA adapts (0 when every layer is adapted)."""
    layers = int(model.config.num_hidden_layers)
    return layers - settings.top_layers if 0 < settings.top_layers < layers else 0


def apply_lora(model: nn.Module, settings: LoraSettings, causal_lm: bool = False):
    """Wrap a sequence-classification model with a PEFT LoRA adapter, head trained and saved; or
    with `causal_lm` a causal LM (adapter only: it loads with stock `PeftModel` and generates)."""
    from peft import LoraConfig, TaskType, get_peft_model

    targets = resolve_targets(model, settings.targets)
    first = first_adapted_layer(model, settings)
    layers = int(model.config.num_hidden_layers)
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM if causal_lm else TaskType.SEQ_CLS, r=settings.rank,
        lora_alpha=settings.alpha, lora_dropout=0.0, target_modules=targets,
        modules_to_save=None if causal_lm else list(settings.extra_trainable),
        layers_to_transform=list(range(first, layers)) if first else None,
        layers_pattern="layers" if first else None,
    )
    torch.manual_seed(settings.seed)  # the same A (and head init) at every institution
    peft_model = get_peft_model(model, config)
    if settings.ffa:
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    peft_model.train()  # from_pretrained() leaves eval mode; Opacus needs train mode (DESIGN.md 7)
    return peft_model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that leave an institution: trainable LoRA (+ head) parameters only."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    unknown = [k for k in state if k not in params or not params[k].requires_grad]
    if unknown:
        raise KeyError(f"adapter tensors not trainable in this model: {unknown[:5]}")
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise ValueError(f"adapter tensor {name}: shape {tuple(value.shape)} != "
                                 f"model's {tuple(params[name].shape)}")
            params[name].copy_(value)
