"""`fedseek` command line."""
from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path

import typer

from fedseek.config import (CODECS, METHODS, PARTITIONS, RECIPES, RULES, CompressionSettings, DataSettings,
                            EWCSettings, FederationSettings, FisherSettings, LoraSettings, OptimSettings,
                            PrivacySettings, RobustSettings)
from fedseek.platform.cli.common import console, fail

app = typer.Typer(help="FedSeek: federated, differentially private LoRA fine-tuning of DeepSeek "
                       "models across institutions that never share their records.",
                  no_args_is_help=True, add_completion=False)


def _choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A str Enum of `values` (typer shows them as the option's choices; they live in fedseek.config)."""
    return Enum(name, {v.replace("-", "_"): v for v in values}, type=str)


Partition = _choices("Partition", PARTITIONS)
Method = _choices("Method", METHODS)
Compression = _choices("Compression", CODECS)
Robust = _choices("Robust", RULES)
Recipe = _choices("Recipe", RECIPES)


@app.command()
def simulate(
    task: str = typer.Option(DataSettings.task, help="Shipped task: banking77 | medical_abstracts | pubmedqa."),
    data: Path = typer.Option(None, help="Your CSV/JSONL file, partitioned across institutions."),
    data_dir: Path = typer.Option(None, help="Directory with one CSV/JSONL per institution (+ optional test.*)."),
    test_data: Path = typer.Option(None, help="Global test file for --data (default: 20% stratified hold-out)."),
    text_column: str = typer.Option(DataSettings.text_column, help="Column holding the text."),
    label_column: str = typer.Option(DataSettings.label_column, help="Column holding the label."),
    institutions: int = typer.Option(FederationSettings.institutions, min=1, help="Simulated institutions (ignored with --data-dir)."),
    rounds: int = typer.Option(FederationSettings.rounds, min=1, help="Federated rounds."),
    recipe: Recipe = typer.Option(Recipe.probe, help="DP recipe: probe = head on every layer's pooled states "
                                  "(public-slice standardization), DP linear probe then optional DP LoRA (LP-FT), "
                                  "hyper-parameters from the rule in fedseek.clients.recipe; lora = the old "
                                  "LoRA + last-layer head recipe."),
    probe_rounds: int = typer.Option(None, min=0, help="probe recipe: head-only rounds before LoRA rounds (default: all)."),
    local_steps: int = typer.Option(None, min=1, help="DP-SGD steps per institution per round (default: the recipe's rule; lora: 12)."),
    batch_fraction: float = typer.Option(None, min=1e-4, max=1.0, help="Poisson sampling rate q, expected batch q*N (default: the rule; lora: 0.125)."),
    learning_rate: float = typer.Option(OptimSettings.learning_rate, min=0.0, help="Peak Adam learning rate of LoRA rounds (warmup, then cosine)."),
    epsilon: float = typer.Option(PrivacySettings.target_epsilon, min=0.01, help="Privacy budget per institution for the whole job."),
    delta: float = typer.Option(None, help="delta (default min(1e-5, 0.01/N) per institution: N·delta <= 0.01)."),
    noise_multiplier: float = typer.Option(None, help="Give sigma directly instead of deriving it from --epsilon."),
    clip_norm: float = typer.Option(None, min=1e-6, help="Per-sample gradient clipping norm C (default: the rule; lora: 1.0)."),
    no_dp: bool = typer.Option(False, "--no-dp", help="Train without differential privacy (for comparison)."),
    reproducible_noise: bool = typer.Option(False, "--reproducible-noise", help="Seed DP noise and sampling "
                                            "from --seed (tests/benchmarks only: NOT private; tracked jobs refuse "
                                            "it unless FEDSEEK_ALLOW_REPRODUCIBLE_NOISE=1)."),
    partition: Partition = typer.Option(Partition.iid, help="How records are split across institutions."),
    alpha: float = typer.Option(DataSettings.alpha, min=1e-3, help="Dirichlet concentration for --partition dirichlet."),
    lora_rank: int = typer.Option(LoraSettings.rank, min=1, help="LoRA rank r."),
    lora_targets: str = typer.Option(LoraSettings.targets, help="'attention', 'attention+mlp' or comma-separated module names."),
    lora_layers: int = typer.Option(LoraSettings.top_layers, min=0, help="Adapt only the top N decoder layers (0 = all)."),
    ffa: bool = typer.Option(False, "--ffa", help="FFA-LoRA: freeze A at a shared seed, train/send only B."),
    base_model: Path = typer.Option(None, help="Local checkpoint directory (DeepSeek-V2/V3, R1-Distill Qwen/Llama); default: embedded."),
    compression: Compression = typer.Option(Compression.none, help="Upload adapter deltas as fp16, int8 or int4 (per-channel scales) instead of float32."),
    topk: float = typer.Option(CompressionSettings.topk, min=0.0, max=0.99, help="Upload only this fraction of each delta's largest entries (0 = all; error feedback keeps the rest)."),
    robust: Robust = typer.Option(Robust.fedavg, help="How the server combines updates: fedavg | trimmed-mean | "
                                  "median (coordinate-wise, against poisoned updates)."),
    trim_fraction: float = typer.Option(RobustSettings.trim_fraction, min=0.0, max=0.49, help="trimmed-mean: fraction cut from each end."),
    server_clip: float = typer.Option(RobustSettings.clip_norm, min=0.0, help="Bound each update's delta to this L2 norm on the server (0 = off)."),
    outlier_ratio: float = typer.Option(RobustSettings.outlier_ratio, min=0.0, help="Reject updates whose norm exceeds this multiple of "
                                        "the round's median (0 = off; needs >= 3 institutions)."),
    max_train_rows: int = typer.Option(DataSettings.max_train_rows, min=0, help="Use at most this many training rows in total (0 = all)."),
    seed: int = typer.Option(FederationSettings.seed, help="Seed for partitioning, sampling and LoRA init."),
    out: Path = typer.Option(Path(FederationSettings.out), help="Output directory (report.json, adapter/)."),
    verbose: bool = typer.Option(False, help="Show Flower/Ray logs."),
    cpus_per_client: float = typer.Option(None, min=0.1, help="CPUs Ray reserves per simulated institution "
                                          "(default: all cores, one institution at a time)."),
    periods: str = typer.Option("", help="Continual learning: period scheme years | intent-groups | "
                                "condition-groups | column | auto (the task's default); one federated job per period."),
    cl: Method = typer.Option(Method.ewc, help="Continual method (with --periods); joint = one job on all periods (upper bound)."),
    ewc_lambda: float = typer.Option(EWCSettings.lam, min=0.0, help="EWC strength λ (Fisher normalised to mean 1)."),
    ewc_gamma: float = typer.Option(EWCSettings.gamma, min=0.0, max=1.0, help="Online-EWC decay γ of the running Fisher."),
    compare: str = typer.Option("", help="Also run these methods as comparison arms, e.g. 'naive,joint'."),
    tune_lambda: str = typer.Option("", help="Pick λ among these (e.g. '0.1,1,10') on the institutions' "
                                    "validation splits of the first two periods."),
    tune_only: bool = typer.Option(False, "--tune-only", help="Stop after choosing λ (--tune-lambda)."),
    period_column: str = typer.Option(None, help="Column of your data holding each row's date or period id."),
    period_freq: str = typer.Option(DataSettings.period_freq, help="With --period-column of ISO dates: year | quarter."),
    period_groups: int = typer.Option(DataSettings.period_groups, min=2, help="Label groups for intent-groups / condition-groups."),
    fisher_noise: float = typer.Option(FisherSettings.noise_multiplier, min=0.0, help="Noise multiplier σ_F of the DP Fisher pass."),
    fisher_rate: float = typer.Option(FisherSettings.sample_rate, min=1e-4, max=1.0, help="Poisson rate of the DP Fisher pass."),
    fisher_granularity: str = typer.Option(FisherSettings.granularity, help="Fisher values released per tensor | row | coordinate."),
    validation_fraction: float = typer.Option(0.1, min=0.0, max=0.5, help="With --periods: records each "
                                              "institution holds out for λ selection."),
    track: bool = typer.Option(True, "--track/--no-track", help="Record the job in the platform DB, "
                               "privacy ledger (refusing over-budget jobs) and MLflow; see `fedseek privacy`."),
) -> None:
    """Run a federation of simulated institutions (Flower simulation engine, Ray backend); with
    --periods, a continual-learning sequence of federated jobs (see `fedseek continual`)."""
    from fedseek.quiet import quiet_environment

    quiet_environment()
    from fedseek.config import JobConfig, RecipeSettings
    from fedseek.data.loader import DataError
    from fedseek.data.periods import DEFAULT_SCHEME
    from fedseek.platform.cli.console import RichReporter
    from fedseek.platform.run.jobs import run_job
    from fedseek.platform.run.simulation import SimulationError

    job = JobConfig(
        data=DataSettings(task=task, data=_path(data), data_dir=_path(data_dir), test_data=_path(test_data),
                          text_column=text_column, label_column=label_column, partition=partition.value,
                          alpha=alpha, max_train_rows=max_train_rows,
                          periods=(DEFAULT_SCHEME.get(task, "column") if periods == "auto" else periods),
                          period_column=period_column, period_freq=period_freq, period_groups=period_groups,
                          validation_fraction=validation_fraction if periods else 0.0),
        lora=LoraSettings(rank=lora_rank, alpha=2.0 * lora_rank, targets=lora_targets,
                          top_layers=lora_layers, ffa=ffa, seed=seed),
        privacy=PrivacySettings(enabled=not no_dp, target_epsilon=epsilon, delta=delta,
                                noise_multiplier=noise_multiplier, clip_norm=clip_norm or PrivacySettings.clip_norm,
                                reproducible_noise=reproducible_noise),
        optim=OptimSettings(local_steps=local_steps or OptimSettings.local_steps,
                            batch_fraction=batch_fraction or OptimSettings.batch_fraction,
                            learning_rate=learning_rate),
        recipe=RecipeSettings(name=recipe.value, probe_rounds=-1 if probe_rounds is None else probe_rounds),
        federation=FederationSettings(institutions=institutions, rounds=rounds, seed=seed,
                                      base_model=_path(base_model), out=str(out)),
        compression=CompressionSettings(codec=compression.value, topk=topk),
    )
    try:
        job.ewc = EWCSettings(method=cl.value, lam=ewc_lambda, gamma=ewc_gamma)
        job.fisher = FisherSettings(sample_rate=fisher_rate, noise_multiplier=fisher_noise,
                                    clip_norm=job.privacy.clip_norm, granularity=fisher_granularity)
        job.robust = RobustSettings(rule=robust.value, trim_fraction=trim_fraction, clip_norm=server_clip,
                                    outlier_ratio=outlier_ratio)
        given = {k for k, v in (("local_steps", local_steps), ("batch_fraction", batch_fraction),
                                ("clip_norm", clip_norm), ("probe_rounds", probe_rounds)) if v is not None}
        job = _preflight(job, given)
        out.mkdir(parents=True, exist_ok=True)
        if not job.data.periods:
            run_job(job, RichReporter(console), verbose=verbose, track=track, cpus_per_client=cpus_per_client)
            return
        from fedseek.aggregator.continual_app import run_continual
        from fedseek.platform.cli.console import print_cl_table

        arms = tuple(m.strip() for m in compare.split(",") if m.strip())
        lambdas = tuple(float(x) for x in tune_lambda.split(",") if x.strip())
        # every arm (comparison methods, λ-tuning candidates) is a platform job: pre-flight checked
        # and charged to the same institutions' ledger as the main method
        result = run_job(job, RichReporter(console), verbose=verbose, track=track,
                         cpus_per_client=cpus_per_client,
                         run=lambda grid, j, r: run_continual(grid, j, r, compare=arms, tune=lambdas,
                                                              tune_only=tune_only))
        if tune_only:
            selection = result["lambda_selection"] or {}
            console.print(f"λ chosen on validation splits: {selection.get('chosen')} "
                          f"{selection.get('validation_acc')}")
            return
        print_cl_table(console, result)
    except (DataError, ValueError, SimulationError) as err:
        fail(str(err))


def _path(value: Path | None) -> str | None:
    return None if value is None else str(value)


def _preflight(job, given: set[str] = frozenset()):
    """Fail fast, before Ray starts: data readable and valid, model loadable, LoRA targets match
    (and trainable under DP); the recipe's rule fills the DP hyper-parameters the user left out."""
    from fedseek.clients.recipe import apply_rule
    from fedseek.data.plan import federated_data
    from fedseek.models.loading import load_classifier, load_tokenizer
    from fedseek.models.lora import resolve_targets

    data = federated_data(job)
    apply_rule(job, [len(t) for t in data.train], given)
    if job.data.data_dir:
        job.federation.institutions = len(data.institutions)
    if job.data.periods:
        from fedseek.data.plan import period_names

        period_names(job)  # the scheme applies to this data (>= 2 periods)
        job.data.period = ""
    tokenizer = load_tokenizer(job.federation.base_model)
    resolve_targets(load_classifier(job.federation.base_model, len(data.label_names),
                                    tokenizer.pad_token_id), job.lora.targets)
    if job.privacy.enabled:  # every trainable tensor must get per-sample gradients, or no DP job starts
        from fedseek.clients.dp_trainer import LocalTrainer
        from fedseek.models.classifier import AdapterClassifier

        LocalTrainer(AdapterClassifier(job.federation.base_model, len(data.label_names), job.lora,
                                       job.data.max_length, pooling=job.recipe.pooling,
                                       components=job.recipe.components)).check_dp()
    return job


def _continual_signature():
    """`fedseek continual` = `fedseek simulate` with --periods defaulting to the task's scheme."""
    import inspect

    signature = inspect.signature(simulate, eval_str=True)
    params = [p.replace(default=typer.Option("auto", help=p.default.help)) if p.name == "periods" else p
              for p in signature.parameters.values()]
    return signature.replace(parameters=params)


def continual(**options) -> None:
    """Continual learning: one federated DP-LoRA job per data period (PubMedQA by year, banking77
    by intent groups, ...), carrying the adapter forward with EWC; prints the accuracy matrix,
    ACC, BWT and Forgetting and writes a heat-map."""
    simulate(**options)


continual.__signature__ = _continual_signature()
app.command("continual")(continual)


@app.command()
def report(path: Path = typer.Argument(Path("runs/latest/report.json"), help="A report.json.")) -> None:
    """Print a report.json written by `fedseek simulate`."""
    if not path.is_file():
        fail(f"{path}: no such file")
    json.dump(json.loads(path.read_text()), sys.stdout, indent=2)
    sys.stdout.write("\n")


from fedseek.platform.cli.admin import register  # noqa: E402  platform admin commands

register(app)

from fedseek.platform.cli.deploy import register_commands as register_deploy  # noqa: E402

register_deploy(app)


def main() -> None:  # pragma: no cover - console-script shim
    app()


if __name__ == "__main__":
    main()
