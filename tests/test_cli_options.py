"""`fedseek simulate` / `continual` options are generated from fedseek.config's dataclasses: every
flagged field is an option, a dataclass default is the CLI default, and a bad value names its flag.
Fast: parsing only, no simulation runs."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from fedseek.config import LoraSettings, OptimSettings, PrivacySettings
from fedseek.platform.cli import options
from fedseek.platform.cli.main import app

ROOT = Path(__file__).parents[1]


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps help and errors to the terminal width


def command(name: str) -> click.Command:
    return typer.main.get_command(app).commands[name]


def flags(cmd: click.Command) -> set[str]:
    return {opt for param in cmd.params for opt in (*param.opts, *param.secondary_opts)}


def help_of(cmd: typer.Typer | click.Command, *args: str) -> str:
    result = CliRunner().invoke(app if isinstance(cmd, click.Command) else cmd, [*args, "--help"])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.replace("│", " ").split())


def test_every_flagged_settings_field_and_run_option_is_in_the_help():
    generated = options.options()
    assert len(generated) >= 45 and {o.flag for o in generated} >= {"epsilon", "lora-rank", "cl", "server-clip"}
    for name in ("simulate", "continual"):
        text = help_of(command(name), name)
        for option in generated:
            assert f"--{option.flag} " in text, (name, option.flag)
            assert option.field.metadata["help"].split("{")[0].strip() in text  # its help, written in config.py
        for extra in ("--no-dp", "--verbose", "--cpus-per-client", "--track", "--no-track", "--compare",
                      "--tune-lambda", "--tune-only"):
            assert f"{extra} " in text, (name, extra)
    # `continual` reuses the same options; only --periods defaults to the task's own scheme
    defaults = {name: {p.name: p.default for p in command(name).params} for name in ("simulate", "continual")}
    assert defaults["continual"] == {**defaults["simulate"], "periods": "auto"}


def test_the_flags_the_docs_use_are_options():
    """Each `--flag` written after `fedseek simulate|continual` in README.md and docs/ is accepted."""
    used = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line in path.read_text().replace("\\\n", " ").splitlines():
            for name, rest in re.findall(r"fedseek (simulate|continual)\b([^`#|]*)", line):
                used += [(path.name, name, flag) for flag in re.findall(r"(?<!\S)--[a-z][a-z-]*", rest)]
    assert len(used) >= 10
    unknown = [item for item in used if item[2] not in flags(command(item[1])) | {"--help"}]
    assert not unknown, unknown


def test_a_dataclass_default_is_the_cli_default(monkeypatch):
    def patch(cls, name, value):
        field = next(f for f in dataclasses.fields(cls) if f.name == name)
        monkeypatch.setattr(field, "default", value)

    patch(LoraSettings, "rank", 8)
    patch(PrivacySettings, "target_epsilon", 4.0)
    patch(OptimSettings, "local_steps", 7)  # left to the recipe's rule: shown in the help text
    seen = []
    probe = typer.Typer()

    def run(**values):
        seen.append(options.to_job(values))

    run.__signature__ = options.signature()  # rebuilt from the patched dataclasses
    probe.command("simulate")(run)
    probe.command("other")(lambda: None)
    text = help_of(probe, "simulate")
    assert re.search(r"--lora-rank INTEGER RANGE \[x>=1\] LoRA rank r\. \[default: 8\]", text), text
    assert "Privacy budget per institution for the whole job. [default: 4.0]" in text
    assert "(default: the recipe's rule; lora: 7)" in text
    result = CliRunner().invoke(probe, ["simulate"])
    assert result.exit_code == 0, result.output
    job, given, _ = seen[-1]
    assert (job.lora.rank, job.lora.alpha, job.privacy.target_epsilon) == (8, 16.0, 4.0)
    assert given == set()  # rule fields left out stay the rule's to fill
    CliRunner().invoke(probe, ["simulate", "--lora-rank", "2", "--local-steps", "3", "--no-dp", "--seed", "5"])
    job, given, _ = seen[-1]
    assert (job.lora.rank, job.lora.alpha, job.lora.seed, job.optim.local_steps) == (2, 4.0, 5, 3)
    assert job.privacy.enabled is False and given == {"local_steps"}


@pytest.mark.parametrize("args, flag", [
    (["--rounds", "0"], "--rounds"),  # typer's bounds, from the field's min
    (["--compression", "zip"], "--compression"),  # choices, from the tuples in fedseek.config
    (["--fisher-granularity", "diagonal"], "--fisher-granularity"),
    (["--topk", "1.5"], "--topk"),
    (["--outlier-ratio", "0.5"], "--outlier-ratio"),  # the dataclass's own check, named by its flag
    (["--trim-fraction", "0.3", "--robust", "median", "--server-clip", "-1"], "--server-clip"),
])
def test_a_bad_value_is_refused_naming_the_flag(args, flag, tmp_path):
    result = CliRunner().invoke(app, ["simulate", "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2, result.output
    assert flag in result.output, result.output
    assert not (tmp_path / "out").exists()  # refused before anything ran
