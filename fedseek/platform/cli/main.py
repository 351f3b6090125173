"""`fedseek` command line."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from fedseek.platform.cli import options
from fedseek.platform.cli.common import console, fail

app = typer.Typer(help="FedSeek: federated, differentially private LoRA fine-tuning of DeepSeek "
                       "models across institutions that never share their records.",
                  no_args_is_help=True, add_completion=False)


def simulate(**values) -> None:
    """Run a federation of simulated institutions (Flower simulation engine, Ray backend); with
    --periods, a continual-learning sequence of federated jobs (see `fedseek continual`)."""
    _run(values)


def continual(**values) -> None:
    """Continual learning: one federated DP-LoRA job per data period (PubMedQA by year, banking77
    by intent groups, ...), carrying the adapter forward with EWC; prints the accuracy matrix,
    ACC, BWT and Forgetting and writes a heat-map."""
    _run(values)


# the options are generated from fedseek.config's dataclasses (fedseek.platform.cli.options)
simulate.__signature__ = options.signature()
continual.__signature__ = options.signature(periods="auto")  # the task's own period scheme
app.command("simulate")(simulate)
app.command("continual")(continual)


def _run(values: dict) -> None:
    from fedseek.quiet import quiet_environment

    quiet_environment()
    try:
        job, given, run = options.to_job(values)
    except ValueError as err:
        fail(str(err))
    from fedseek.data.loader import DataError
    from fedseek.platform.cli.console import RichReporter
    from fedseek.platform.run.jobs import run_job
    from fedseek.platform.run.simulation import SimulationError

    try:
        job = _preflight(job, given)
        Path(job.federation.out).mkdir(parents=True, exist_ok=True)
        settings = dict(verbose=run["verbose"], track=run["track"], cpus_per_client=run["cpus_per_client"])
        if not job.data.periods:
            run_job(job, RichReporter(console), **settings)
            return
        from fedseek.aggregator.continual_app import run_continual
        from fedseek.platform.cli.console import print_cl_table

        arms = tuple(m.strip() for m in run["compare"].split(",") if m.strip())
        lambdas = tuple(float(x) for x in run["tune_lambda"].split(",") if x.strip())
        # every arm (comparison methods, λ-tuning candidates) is a platform job: pre-flight checked
        # and charged to the same institutions' ledger as the main method
        result = run_job(job, RichReporter(console), **settings,
                         run=lambda grid, j, r: run_continual(grid, j, r, compare=arms, tune=lambdas,
                                                              tune_only=run["tune_only"]))
        if run["tune_only"]:
            selection = result["lambda_selection"] or {}
            console.print(f"λ chosen on validation splits: {selection.get('chosen')} "
                          f"{selection.get('validation_acc')}")
            return
        print_cl_table(console, result)
    except (DataError, ValueError, SimulationError) as err:
        fail(str(err))


def _preflight(job, given: set[str] = frozenset()):
    """Fail fast, before Ray starts: data readable and valid, model loadable, LoRA targets match
    (and trainable under DP); the recipe's rule fills the DP hyper-parameters the user left out."""
    from fedseek.clients.recipe import apply_generative_rule, apply_rule
    from fedseek.data.plan import federated_data

    apply_generative_rule(job, given)
    data = federated_data(job)  # before torch is imported: a bad file is refused in a fraction of a second
    apply_rule(job, [len(t) for t in data.train], given)
    if job.data.data_dir:
        job.federation.institutions = len(data.institutions)
    if job.data.periods:
        from fedseek.data.plan import period_names

        period_names(job)  # the scheme applies to this data (>= 2 periods)
        job.data.period = ""
    from fedseek.models.adapted import adapted_model

    model = adapted_model(job, len(data.label_names))  # loadable, LoRA targets match (LoraTargetError)
    if job.privacy.enabled:  # every trainable tensor must get per-sample gradients, or no DP job starts
        from fedseek.clients.dp_trainer import LocalTrainer

        LocalTrainer(model).check_dp()
    return job


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

from fedseek.platform.cli.generate import register as register_generate  # noqa: E402

register_generate(app)


def main() -> None:  # pragma: no cover - console-script shim
    app()


if __name__ == "__main__":
    main()
