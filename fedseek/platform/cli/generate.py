"""`fedseek generate`: the greedy answers of a registered causal-lm adapter version (the task's
`champion` by default) to prompts. The version's adapter is downloaded from the MLflow registry,
checked against the base model it will run on (the `base_model_sha256` tag) and refused if it is a
classifier; the answers are those of `AdapterGenerator.from_adapter(adapter).generate(prompts)`."""
from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path

import typer

from fedseek.platform.cli.common import err_console, fail, settings as _settings

GENERATIVE_TASKS = "banking77-gen, pubmedqa-gen"


def generate(
    task: str = typer.Option(..., help="Task whose registered adapter answers (model fedseek-<task>)."),
    prompt: list[str] = typer.Option(None, "--prompt", help="A prompt (repeat for several)."),
    prompts_file: Path = typer.Option(None, help="Prompts: one per line, or a .csv/.jsonl file with "
                                      "--prompt-column."),
    prompt_column: str = typer.Option("prompt", help="Column (CSV) or key (JSONL) of the prompts in --prompts-file."),
    alias: str = typer.Option(None, help="Registry alias of the version (default: champion)."),
    version: str = typer.Option(None, help="Version number instead of an alias (see `fedseek versions`)."),
    base_model: Path = typer.Option(None, help="Base checkpoint directory (default: the one recorded in the "
                                    "adapter if present here, else the embedded model)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (version, base, answers)."),
) -> None:
    """Answer prompts with a registered causal-lm adapter version (greedy decoding), after checking
    that its base model is the one it was trained on."""
    from fedseek.quiet import quiet_environment

    quiet_environment()
    if alias and version:
        fail("give --alias or --version, not both")
    prompts = list(prompt or []) + (read_prompts(prompts_file, prompt_column) if prompts_file else [])
    if not prompts:
        fail("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE")
    client, chosen, name = find_version(task, alias or ("champion" if not version else None), version)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory(prefix="fedseek-generate-") as tmp:
        adapter = fetch_adapter(client, chosen, name, tmp)
        base = check_base(chosen, name, adapter, base_model)
        from fedseek.models.generator import AdapterGenerator
        from fedseek.models.loading import ModelLoadError

        try:
            answers = AdapterGenerator.from_adapter(adapter, base=base).generate(prompts)
        except ModelLoadError as err:
            fail(str(err))
    if as_json:
        typer.echo(json.dumps({"model": name, "version": str(chosen.version), "aliases": list(chosen.aliases or []),
                               "base_model_sha256": chosen.tags.get("base_model_sha256"),
                               "answers": [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)]}))
        return
    err_console.print(f"{name} v{chosen.version}" + (f" ({', '.join(chosen.aliases)})" if chosen.aliases else ""))
    for p, a in zip(prompts, answers):  # plain echo: prompts and answers are never read as markup
        typer.echo(f"> {p}\n{a}\n")


def read_prompts(path: Path, column: str) -> list[str]:
    """Prompts of a file: a CSV's or JSONL's `column`, else every non-empty line."""
    if not path.is_file():
        fail(f"{path}: no such file")
    text = path.read_text(encoding="utf-8-sig")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if column not in (reader.fieldnames or []):
            fail(f"{path}: no column {column!r} (columns: {', '.join(reader.fieldnames or [])}); "
                 "choose one with --prompt-column")
        return [row[column] for row in reader if (row[column] or "").strip()]
    if suffix in (".jsonl", ".ndjson"):
        prompts = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                fail(f"{path}:{number}: not JSON ({err.msg})")
            if not isinstance(record, dict) or not isinstance(record.get(column), str):
                fail(f"{path}:{number}: no string {column!r}; choose the key with --prompt-column")
            prompts.append(record[column])
        return prompts
    return [line for line in text.splitlines() if line.strip()]


def find_version(task: str, alias: str | None, version: str | None):
    """(client, the `ModelVersion` of `fedseek-<task>` at `alias` or `version`, the model's name); clear
    errors for an unknown task, a missing alias (no champion yet) or version."""
    from mlflow.exceptions import MlflowException

    from fedseek.platform.cli.common import mlflow_client
    from fedseek.platform.mlflow.registry import model_name

    name = model_name(task)
    try:
        client = mlflow_client()
    except MlflowException as err:
        fail(f"MLflow ({_settings().tracking_uri}): {str(err).splitlines()[0]}")
    try:
        client.get_registered_model(name)
    except MlflowException:
        fail(f"no registered model {name}: no tracked job of task {task!r} has registered an adapter "
             "(`fedseek versions` lists the registered ones)")
    try:
        if version is not None:
            chosen = client.get_model_version(name, version)
        else:
            chosen = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        if version is not None:
            fail(f"{name} has no version {version} (`fedseek versions --task {task}` lists them)")
        if alias == "champion":
            fail(f"{name} has no champion yet: promote a version with `fedseek promote --task {task}`, or "
                 f"answer with the newest version using --alias candidate (or --version N; "
                 f"`fedseek versions --task {task}` lists them)")
        fail(f"{name} has no version aliased {alias!r} (`fedseek versions --task {task}` lists them)")
    if chosen.tags.get("objective") == "classify":
        fail(_classifier(name, chosen.version))
    return client, chosen, name


def fetch_adapter(client, chosen, name: str, destination: str) -> Path:
    """The version's adapter directory, downloaded; a classification adapter is refused."""
    from mlflow.exceptions import MlflowException

    from fedseek.models.generator import GENERATION_FILE
    from fedseek.platform.mlflow.registry import download_version

    try:
        adapter = Path(download_version(client, chosen, destination))
    except (MlflowException, OSError) as err:
        fail(f"{name} v{chosen.version}: cannot download its adapter from {chosen.source}: "
             f"{str(err).splitlines()[0]}")
    if not (adapter / GENERATION_FILE).is_file():
        fail(_classifier(name, chosen.version))
    return adapter


def _classifier(name: str, version) -> str:
    return (f"{name} v{version} is a classifier (a classification adapter, no generation.json): it predicts "
            f"labels and cannot generate answers; `fedseek generate` answers with causal-lm adapters "
            f"(tasks {GENERATIVE_TASKS}, or --objective causal-lm)")


def check_base(chosen, name: str, adapter: Path, base_model: Path | None) -> str | None:
    """The base directory the adapter will run on (--base-model, else the one its adapter_config
    records if present here, else the embedded model: `AdapterGenerator.from_adapter`'s rule),
    refused if its weights' sha256 is not the version's `base_model_sha256` tag."""
    from fedseek.models.loading import ModelLoadError, base_model_hash, resolve_base

    if base_model is not None:
        base = str(base_model)
    else:
        recorded = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
        base = recorded if recorded and Path(recorded, "config.json").is_file() else None
    try:
        where, actual = resolve_base(base), base_model_hash(base)
    except ModelLoadError as err:
        fail(str(err))
    expected = chosen.tags.get("base_model_sha256")
    if not expected:
        err_console.print(f"warning: {name} v{chosen.version} records no base_model_sha256; "
                          f"its base cannot be checked against {where}")
    elif expected != actual:
        fail(f"{name} v{chosen.version} was trained on a base model with sha256 {expected[:16]}…, but "
             f"{where} has sha256 {actual[:16]}…: its answers would be wrong. Pass the base checkpoint it "
             "was trained on with --base-model DIR")
    return base


def register(app: typer.Typer) -> None:
    """Add `fedseek generate` to the `fedseek` app."""
    app.command()(generate)
