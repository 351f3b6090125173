"""`fedseek` command line."""
from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(help="FedSeek: federated, differentially private LoRA fine-tuning of DeepSeek "
                       "models across institutions that never share their records.",
                  no_args_is_help=True, add_completion=False)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True, highlight=False)


class Partition(str, Enum):
    iid = "iid"
    dirichlet = "dirichlet"


class Targets(str, Enum):
    attention = "attention"
    attention_mlp = "attention+mlp"


@app.command()
def simulate(
    task: str = typer.Option("banking77", help="Shipped task: banking77 | medical_abstracts | pubmedqa."),
    data: Path = typer.Option(None, help="Your CSV/JSONL file, partitioned across institutions."),
    data_dir: Path = typer.Option(None, help="Directory with one CSV/JSONL per institution (+ optional test.*)."),
    test_data: Path = typer.Option(None, help="Global test file for --data (default: 20% stratified hold-out)."),
    text_column: str = typer.Option("text", help="Column holding the text."),
    label_column: str = typer.Option("label", help="Column holding the label."),
    institutions: int = typer.Option(3, min=1, help="Simulated institutions (ignored with --data-dir)."),
    rounds: int = typer.Option(5, min=1, help="Federated rounds."),
    local_steps: int = typer.Option(12, min=1, help="DP-SGD steps per institution per round."),
    batch_fraction: float = typer.Option(0.125, min=1e-4, max=1.0, help="Poisson sampling rate q (expected batch = q*N)."),
    learning_rate: float = typer.Option(2e-2, min=0.0, help="Peak Adam learning rate (warmup, then cosine)."),
    epsilon: float = typer.Option(8.0, min=0.01, help="Privacy budget per institution for the whole job."),
    delta: float = typer.Option(None, help="delta (default min(1e-5, 1/N^1.1) per institution)."),
    noise_multiplier: float = typer.Option(None, help="Give sigma directly instead of deriving it from --epsilon."),
    clip_norm: float = typer.Option(1.0, min=1e-6, help="Per-sample gradient clipping norm C."),
    no_dp: bool = typer.Option(False, "--no-dp", help="Train without differential privacy (for comparison)."),
    partition: Partition = typer.Option(Partition.iid, help="How records are split across institutions."),
    alpha: float = typer.Option(0.5, min=1e-3, help="Dirichlet concentration for --partition dirichlet."),
    lora_rank: int = typer.Option(16, min=1, help="LoRA rank r."),
    lora_targets: str = typer.Option("attention", help="'attention', 'attention+mlp' or comma-separated module names."),
    lora_layers: int = typer.Option(1, min=0, help="Adapt only the top N decoder layers (0 = all)."),
    ffa: bool = typer.Option(False, "--ffa", help="FFA-LoRA: freeze A at a shared seed, train/send only B."),
    base_model: Path = typer.Option(None, help="Local checkpoint directory (DeepSeek-V2/V3, R1-Distill Qwen/Llama); default: embedded."),
    max_train_rows: int = typer.Option(0, min=0, help="Use at most this many training rows in total (0 = all)."),
    seed: int = typer.Option(0, help="Seed for partitioning, sampling and LoRA init."),
    out: Path = typer.Option(Path("runs/latest"), help="Output directory (report.json, adapter/)."),
    verbose: bool = typer.Option(False, help="Show Flower/Ray logs."),
    track: bool = typer.Option(True, "--track/--no-track", help="Record the job in the platform DB, "
                               "privacy ledger (refusing over-budget jobs) and MLflow; see `fedseek privacy`."),
) -> None:
    """Run a federation of simulated institutions (Flower simulation engine, Ray backend)."""
    from fedseek.platform.simulation import quiet_environment

    quiet_environment()
    from fedseek.config import DataSettings, FederationSettings, JobConfig
    from fedseek.clients.dp_trainer import OptimSettings, PrivacySettings
    from fedseek.data.loader import DataError
    from fedseek.models.lora import LoraSettings
    from fedseek.platform.console import RichReporter
    from fedseek.platform.jobs import run_job
    from fedseek.platform.simulation import SimulationError

    job = JobConfig(
        data=DataSettings(task=task, data=_path(data), data_dir=_path(data_dir), test_data=_path(test_data),
                          text_column=text_column, label_column=label_column, partition=partition.value,
                          alpha=alpha, max_train_rows=max_train_rows),
        lora=LoraSettings(rank=lora_rank, alpha=2.0 * lora_rank, targets=lora_targets,
                          top_layers=lora_layers, ffa=ffa, seed=seed),
        privacy=PrivacySettings(enabled=not no_dp, target_epsilon=epsilon, delta=delta,
                                noise_multiplier=noise_multiplier, clip_norm=clip_norm),
        optim=OptimSettings(local_steps=local_steps, batch_fraction=batch_fraction, learning_rate=learning_rate),
        federation=FederationSettings(institutions=institutions, rounds=rounds, seed=seed,
                                      base_model=_path(base_model), out=str(out)),
    )
    try:
        job = _preflight(job)
        out.mkdir(parents=True, exist_ok=True)
        run_job(job, RichReporter(console), verbose=verbose, track=track)
    except (DataError, ValueError, SimulationError) as err:
        err_console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(code=2)


def _path(value: Path | None) -> str | None:
    return None if value is None else str(value)


def _preflight(job):
    """Fail fast, before Ray starts: data readable and valid, model loadable, LoRA targets match."""
    from fedseek.config import data_arguments
    from fedseek.data.tasks import load_federated_data
    from fedseek.models.loading import load_classifier, load_tokenizer
    from fedseek.models.lora import resolve_targets

    data = load_federated_data(**data_arguments(job))
    if job.data.data_dir:
        job.federation.institutions = len(data.institutions)
    tokenizer = load_tokenizer(job.federation.base_model)
    resolve_targets(load_classifier(job.federation.base_model, len(data.label_names),
                                    tokenizer.pad_token_id), job.lora.targets)
    return job


@app.command()
def report(path: Path = typer.Argument(Path("runs/latest/report.json"), help="A report.json.")) -> None:
    """Print a report.json written by `fedseek simulate`."""
    if not path.is_file():
        err_console.print(f"[bold red]error:[/] {path}: no such file")
        raise typer.Exit(code=2)
    json.dump(json.loads(path.read_text()), sys.stdout, indent=2)
    sys.stdout.write("\n")


from fedseek.platform.admin_cli import register  # noqa: E402  platform admin commands

register(app)


def main() -> None:  # pragma: no cover - console-script shim
    app()


if __name__ == "__main__":
    main()
