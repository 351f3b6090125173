"""Communication benchmark: bytes uploaded per institution per round, as a fraction of the base
model, for each update-compression setting, and what each setting costs in accuracy.

Accuracy: the default DP job (banking77, 3 banks, 5 rounds x 12 steps, eps = 8) in process with
the pipeline's own encode/decode (`bench/inprocess_federation.py`), the same seeds for every
codec, so the only difference between rows is the compression. Scale: the adapter's share of the
base model for the embedded model, a ~100M-parameter DeepSeek-V3 config and the published
DeepSeek-V3 (671B) config, counted on PyTorch's meta device (no weights are built).

    python bench/communication.py [--seeds 0 1] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from bench_io import RESULTS, pyplot, save_figure, write_json
from inprocess_federation import InProcessJob, run
from fedseek.config import CompressionSettings
from fedseek.wire.compression import encode, payload_bytes

SETTINGS = [("none", 0.0), ("fp16", 0.0), ("int8", 0.0), ("int4", 0.0), ("int8", 0.25), ("int8", 0.1)]
TRAINED = ["none", "int8", "int4", "int8+top25%"]  # accuracy measured (2-core budget); bytes for all


def label(codec: str, topk: float) -> str:
    return codec + (f"+top{int(topk * 100)}%" if topk else "")


def model_scale_rows(rank: int = 16, top_layers: int = 1, num_labels: int = 77) -> list[dict]:
    """Adapter vs base size for three DeepSeek-V3 sizes (LoRA on attention of the top layers + head)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, DeepseekV3Config

    from fedseek.models.loading import EMBEDDED_MODEL
    from fedseek.models.lora import MLA_ATTENTION
    from large_model import hundred_million_config

    configs = {"embedded (3.4M)": AutoConfig.from_pretrained(EMBEDDED_MODEL),
               "random-init ~100M": hundred_million_config(),
               "DeepSeek-V3 671B (published config)": DeepseekV3Config()}
    rows = []
    for name, config in configs.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        base = sum(p.numel() for p in model.parameters())
        first = config.num_hidden_layers - top_layers
        shapes = {}
        for module_name, module in model.named_modules():
            parts = module_name.split(".")
            if (isinstance(module, torch.nn.Linear) and parts[-1] in MLA_ATTENTION and "layers" in parts
                    and int(parts[parts.index("layers") + 1]) >= first):
                shapes[module_name + ".lora_A"] = (rank, module.in_features)
                shapes[module_name + ".lora_B"] = (module.out_features, rank)
        shapes["score"] = (num_labels, config.hidden_size)
        params = sum(a * b for a, b in shapes.values())
        zeros = {k: np.random.default_rng(0).normal(size=s).astype(np.float32) for k, s in shapes.items()}
        row = {"model": name, "base_params": int(base), "adapter_params": int(params),
               "base_bytes_bf16": int(2 * base)}
        for codec, topk in SETTINGS:
            sent = payload_bytes(encode(zeros, CompressionSettings(codec=codec, topk=topk)))
            row[label(codec, topk)] = {"bytes": sent, "fraction_of_base_bf16": sent / (2 * base)}
        rows.append(row)
        print(name, base, params, flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=12)
    p.add_argument("--train", nargs="+", default=TRAINED, help="settings whose accuracy is measured")
    p.add_argument("--reuse", action="store_true", help="keep the runs of the saved JSON, run only new settings")
    a = p.parse_args()
    from fedseek.models.loading import base_model_bytes

    base_bytes = base_model_bytes(None)
    runs = []
    if a.reuse and (RESULTS / "communication.json").is_file():
        runs = [r for r in json.loads((RESULTS / "communication.json").read_text())["runs"]
                if r["seed"] in a.seeds and len(r["accuracy_per_round"]) == a.rounds]
    for seed in a.seeds:
        for codec, topk in SETTINGS:  # interleaved per seed
            if label(codec, topk) not in a.train or any(
                    r["setting"] == label(codec, topk) and r["seed"] == seed for r in runs):
                continue
            job = InProcessJob(seed=seed, rounds=a.rounds, local_steps=a.local_steps,
                               compression=CompressionSettings(codec=codec, topk=topk))
            result = run(job)
            per_client = float(np.mean([r["bytes_up"] for r in result["rounds"]])) / 3
            runs.append({"setting": label(codec, topk), "seed": seed, "final_accuracy": result["final_accuracy"],
                         "bytes_per_client_round": per_client, "wall_s": result["wall_s"],
                         "accuracy_per_round": [r["accuracy"] for r in result["rounds"]]})
            print(runs[-1], flush=True)
    scale = model_scale_rows()
    embedded = scale[0]
    summary = []
    reference = {r["seed"]: r["final_accuracy"] for r in runs if r["setting"] == "none"}
    for codec, topk in SETTINGS:  # bytes: real payloads of the embedded adapter (as in training)
        mine = [r for r in runs if r["setting"] == label(codec, topk)]
        sent = embedded[label(codec, topk)]["bytes"]
        summary.append({
            "setting": label(codec, topk), "bytes_per_client_round": sent,
            "fraction_of_base_model": sent / base_bytes,
            "fewer_bytes_than_float32": embedded["none"]["bytes"] / sent,
            "final_accuracy_mean": float(np.mean([r["final_accuracy"] for r in mine])) if mine else None,
            "accuracy_change_points": float(np.mean([100 * (r["final_accuracy"] - reference[r["seed"]])
                                                     for r in mine])) if mine and reference else None})
    command = f"python bench/communication.py --seeds {' '.join(map(str, a.seeds))} --rounds {a.rounds}"
    write_json("communication", {"command": command, "base_model_bytes": base_bytes,
        "summary": summary, "runs": runs, "model_scale": scale})
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for row in [r for r in summary if r["final_accuracy_mean"] is not None]:
        left.scatter(row["bytes_per_client_round"] / 1024, 100 * row["final_accuracy_mean"], s=40)
        left.annotate(row["setting"], (row["bytes_per_client_round"] / 1024, 100 * row["final_accuracy_mean"]),
                      textcoords="offset points", xytext=(4, 4), fontsize=8)
    left.set_xscale("log")
    left.set(xlabel="KiB uploaded per bank per round (log)", ylabel="final accuracy, DP eps=8 (%)",
             title="banking77, 3 banks: compression vs accuracy")
    names = [r["model"] for r in scale]
    for k, (codec, topk) in enumerate(SETTINGS):
        right.bar(np.arange(len(names)) + 0.14 * (k - 2.5), [100 * r[label(codec, topk)]["fraction_of_base_bf16"]
                                                           for r in scale], 0.14, label=label(codec, topk))
    right.axhline(0.5, color="k", ls="--", lw=0.8, label="goal 0.5 %")
    right.set_yscale("log")
    right.set_xticks(range(len(names)), [n.split(" (")[0] for n in names], fontsize=8)
    right.set(ylabel="upload / base model bf16 bytes (%, log)", title="adapter share of the base model")
    right.legend(fontsize=7)
    save_figure(fig, "communication")


if __name__ == "__main__":
    main()
