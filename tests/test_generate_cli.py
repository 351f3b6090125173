"""`fedseek generate` on a real MLflow server: a registered causal-lm adapter version answers prompts
exactly as `AdapterGenerator.from_adapter` does on the same adapter; a version trained on another
base, a classification adapter and a task without a champion are refused with clear messages.
Causal-lm versions carry their objective, score and generation figures as tags and in the
description, and the promotion gate names and compares the score `accuracy` stands for."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import free_port, start_mlflow_server, stop
from fedseek.config import LoraSettings
from fedseek.models.generator import AdapterGenerator
from fedseek.models.loading import base_model_hash
from fedseek.platform.mlflow.dashboard import version_description
from fedseek.platform.mlflow.registry import Limits, gate, model_name, register, version_tags

PROMPTS = ["How do I top up my account?", "My card has not arrived yet, what should I do?", "Exchange rate?"]
REPORT = {"final_accuracy": 0.25, "objective": "causal-lm", "score_metric": "exact_match", "final_perplexity": 12.3,
          "final_exact_match": 0.25, "final_rouge_l": 0.4, "epsilon": {"bank_a": 1.5}, "delta": 1e-5}


def new_generator() -> AdapterGenerator:
    return AdapterGenerator(None, LoraSettings(extra_trainable=[]), 96, max_new_tokens=16)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1, a saved causal-lm adapter whose random lora_B changes
    the base model's answers (and those base answers), a saved classification adapter, and the
    environment a `fedseek` subprocess reads its settings from."""
    from mlflow.tracking import MlflowClient

    from fedseek.models.classifier import AdapterClassifier

    root = tmp_path_factory.mktemp("generate")
    port = free_port()
    server = start_mlflow_server(f"sqlite:///{root / 'mlflow.db'}", str(root / "mlartifacts"), port)
    try:
        model = new_generator()
        base_answers = model.generate(PROMPTS)  # lora_B is zero: the adapter is still a no-op
        noise = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in model.model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=noise) * 0.5)
        adapter = root / "adapter"
        model.model.save_pretrained(adapter)
        model.save_settings(adapter)
        classifier_dir = root / "classifier"
        AdapterClassifier(None, 3, LoraSettings()).model.save_pretrained(classifier_dir)
        (classifier_dir / "labels.json").write_text(json.dumps(["a", "b", "c"]))
        tracking = f"http://127.0.0.1:{port}"
        env = {**os.environ, "FEDSEEK_MLFLOW_URI": tracking, "FEDSEEK_HOME": str(root / "home"),
               "FEDSEEK_DB_URL": f"sqlite:///{root / 'platform.db'}", "PYTHONWARNINGS": "ignore"}
        client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
        yield {"client": client, "adapter": adapter, "classifier": classifier_dir, "env": env,
               "base_answers": base_answers, "experiment": client.create_experiment("generate-tests")}
    finally:
        stop(server)


def add_version(registry, task: str, adapter, champion: bool = False, **report) -> str:
    """Log `adapter` as a run artifact and register it as a new version of fedseek-<task> with the
    tags of a minimal report (the embedded base's sha256 unless `report` overrides it)."""
    client = registry["client"]
    run_id = client.create_run(registry["experiment"]).info.run_id
    client.log_artifacts(run_id, str(adapter), "adapter")
    full = {**REPORT, "base_model_sha256": base_model_hash(None), **report}
    version = register(client, model_name(task), run_id, "adapter", version_tags(full, 1, "test"))
    if champion:
        client.set_registered_model_alias(model_name(task), "champion", version)
    return version


def fedseek(registry, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedseek", *args], capture_output=True, text=True,
                          env=registry["env"], timeout=600)


def test_the_champion_answers_as_the_adapter_does_locally(registry, tmp_path):
    add_version(registry, "gen-ok", registry["adapter"], champion=True)
    expected = AdapterGenerator.from_adapter(registry["adapter"]).generate(PROMPTS)
    assert expected != registry["base_answers"]  # the adapter changes answers: it was applied

    args = ["generate", "--task", "gen-ok"] + [x for p in PROMPTS[:2] for x in ("--prompt", p)]
    prompts_file = tmp_path / "prompts.csv"
    prompts_file.write_text("id,question\n1,\"" + PROMPTS[2] + "\"\n")
    result = fedseek(registry, *args, "--prompts-file", str(prompts_file), "--prompt-column", "question", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["model"] == "fedseek-gen-ok" and out["version"] == "1" and "champion" in out["aliases"]
    assert [a["prompt"] for a in out["answers"]] == PROMPTS
    assert [a["answer"] for a in out["answers"]] == expected

    text = tmp_path / "prompts.txt"
    text.write_text("\n".join(PROMPTS) + "\n\n")
    plain = fedseek(registry, "generate", "--task", "gen-ok", "--version", "1", "--prompts-file", str(text))
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == "".join(f"> {p}\n{a}\n\n" for p, a in zip(PROMPTS, expected))


def test_a_version_trained_on_another_base_is_refused(registry):
    add_version(registry, "gen-base", registry["adapter"], champion=True, base_model_sha256="0" * 64)
    result = fedseek(registry, "generate", "--task", "gen-base", "--prompt", PROMPTS[0])
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert "trained on a base model with sha256 0000000000000000" in message
    assert base_model_hash(None)[:16] in message and "--base-model" in message
    assert result.stdout == ""


def test_a_classification_adapter_is_refused_as_a_classifier(registry):
    # an older version without the objective tag: refused by its files (no generation.json) ...
    untagged = add_version(registry, "gen-cls", registry["classifier"], objective=None, score_metric=None)
    # ... and one tagged objective=classify: refused before downloading
    tagged = add_version(registry, "gen-cls", registry["classifier"], objective="classify", score_metric="accuracy")
    for version in (untagged, tagged):
        result = fedseek(registry, "generate", "--task", "gen-cls", "--version", version, "--prompt", PROMPTS[0])
        assert result.returncode == 2
        message = " ".join(result.stderr.split())
        assert f"fedseek-gen-cls v{version} is a classifier" in message and "causal-lm" in message
        assert result.stdout == ""


def test_no_champion_names_promote_and_the_candidate_alias(registry):
    add_version(registry, "gen-new", registry["adapter"])  # aliased candidate only
    result = fedseek(registry, "generate", "--task", "gen-new", "--prompt", PROMPTS[0])
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert "fedseek-gen-new has no champion yet" in message
    assert "fedseek promote --task gen-new" in message and "--alias candidate" in message
    unknown = fedseek(registry, "generate", "--task", "gen-none", "--prompt", PROMPTS[0])
    assert unknown.returncode == 2 and "no registered model fedseek-gen-none" in " ".join(unknown.stderr.split())


def test_causal_lm_versions_carry_their_score_and_generation_figures(registry):
    version = add_version(registry, "gen-tags", registry["adapter"])
    registered = registry["client"].get_model_version(model_name("gen-tags"), version)
    assert {k: registered.tags[k] for k in ("objective", "score_metric", "perplexity", "exact_match", "rouge_l")} == {
        "objective": "causal-lm", "score_metric": "exact_match", "perplexity": "12.3", "exact_match": "0.25",
        "rouge_l": "0.4"}
    description = registered.description
    assert "Score (exact match) **25.00%**" in description
    assert "perplexity 12.300 · exact match 25.00% · ROUGE-L 0.4000" in description
    assert "exact match for short label-like answers, ROUGE-L for free-text answers" in description
    classify = version_tags({"final_accuracy": 0.5, "objective": "classify", "score_metric": "accuracy"}, 1, "s")
    assert not {"perplexity", "exact_match", "rouge_l"} & set(classify)
    assert version_description({k: str(v) for k, v in classify.items()}).split("\n\n")[1].startswith("Accuracy **50")


def test_the_gate_compares_the_score_that_accuracy_stands_for():
    limits = Limits()
    em = {"accuracy": "0.30", "score_metric": "exact_match", "exact_match": "0.30", "rouge_l": "0.50"}
    assert gate(em, None, [], limits) == (True, "first version (exact match 0.3000); no champion yet")
    assert gate(em, {**em, "accuracy": "0.40"}, [], limits) == (False, "exact match 0.3000 < champion's 0.4000")
    # a champion scored by ROUGE-L (other data of the task): compared on the candidate's own score
    champion = {"accuracy": "0.60", "score_metric": "rouge_l", "exact_match": "0.20", "rouge_l": "0.60"}
    assert gate(em, champion, [], limits) == (True, "exact match 0.3000 >= champion's 0.2000")
    assert gate(em, {"accuracy": "0.1", "score_metric": "rouge_l"}, [], limits) == (
        False, "exact match is not comparable with the champion's accuracy (ROUGE-L)")
