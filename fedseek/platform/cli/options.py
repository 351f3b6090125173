"""The options of `fedseek simulate` and `fedseek continual`, generated from fedseek.config.

Every settings field declared with `config.opt` becomes one typer option: its flag, help, default,
bounds and choices are written there, once. The few options that are not one field (--no-dp, --track,
the continual-learning arms, ...) are declared in `run_options` below; `to_job` turns the parsed
values back into a JobConfig. Typer reads a command's `__signature__`, which `signature` builds.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple, get_type_hints

import typer

from fedseek.config import JobConfig, PrivacySettings


class FieldOption(NamedTuple):
    """One generated option: the settings field `section.field` behind `--flag`."""

    section: str
    field: dataclasses.Field
    flag: str
    annotation: Any  # the type typer parses the value as

    @property
    def name(self) -> str:  # the command's parameter name
        return self.flag.replace("-", "_")

    @property
    def default(self) -> Any:
        """The command's default: the field's, the CLI's own (`cli_default`), or None where the DP
        recipe's rule fills the field unless it is given (`rule`)."""
        meta = self.field.metadata
        return None if meta.get("rule") else meta.get("cli_default", self.field.default)


class Parsed(NamedTuple):
    job: JobConfig
    given: set[str]  # `rule` fields the user set (fedseek.clients.recipe.apply_rule keeps them)
    run: dict[str, Any]  # the values of `run_options` that steer the run, not the job


def run_options() -> list[tuple[str, str, Any, Any]]:
    """The options that are not one settings field: (listed after this section, name, type, option)."""
    return [
        ("privacy", "no_dp", bool, typer.Option(False, "--no-dp", help="Train without differential privacy "
                                                "(for comparison).")),
        ("federation", "verbose", bool, typer.Option(False, help="Show Flower/Ray logs.")),
        ("federation", "cpus_per_client", float, typer.Option(
            None, min=0.1, help="CPUs Ray reserves per simulated institution (default: all cores, one "
            "institution at a time).")),
        ("federation", "track", bool, typer.Option(
            True, "--track/--no-track", help="Record the job in the platform DB, privacy ledger (refusing "
            "over-budget jobs) and MLflow; see `fedseek privacy`.")),
        ("ewc", "compare", str, typer.Option("", help="Also run these methods as comparison arms, e.g. "
                                             "'naive,joint'.")),
        ("ewc", "tune_lambda", str, typer.Option("", help="Pick λ among these (e.g. '0.1,1,10') on the "
                                                 "institutions' validation splits of the first two periods.")),
        ("ewc", "tune_only", bool, typer.Option(False, "--tune-only", help="Stop after choosing λ (--tune-lambda).")),
    ]


def _choices(flag: str, values: tuple[str, ...]) -> type[Enum]:
    """A str Enum of `values` (typer shows them as the option's choices)."""
    return Enum(flag.title().replace("-", ""), {v.replace("-", "_"): v for v in values}, type=str)


def _without_none(hint: Any) -> Any:
    """`float | None` -> float (an unset option is None anyway)."""
    return next(k for k in getattr(hint, "__args__", (hint,)) if k is not type(None))


def options() -> list[FieldOption]:
    """One FieldOption per settings field declared with `opt`, in JobConfig's section order."""
    found = []
    for section, cls in get_type_hints(JobConfig).items():
        hints = get_type_hints(cls)
        for item in dataclasses.fields(cls):
            meta = item.metadata
            if "help" not in meta:
                continue
            flag = meta["flag"] or item.name.replace("_", "-")
            if "choices" in meta:
                kind = _choices(flag, meta["choices"])
            else:
                kind = Path if meta.get("path") else _without_none(hints[item.name])
            found.append(FieldOption(section, item, flag, kind))
    return found


def _parameter(option: FieldOption, default: Any) -> inspect.Parameter:
    meta = option.field.metadata
    text = meta["help"].replace("{default}", str(option.field.default))
    if option.annotation is bool:  # a plain switch: --ffa, never --no-ffa
        info = typer.Option(default, f"--{option.flag}", help=text)
    else:
        if default is not None and isinstance(option.annotation, type) and issubclass(option.annotation, Enum):
            default = option.annotation(default)
        info = typer.Option(default, f"--{option.flag}", help=text, min=meta.get("min"), max=meta.get("max"))
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=info,
                             annotation=option.annotation)


def signature(**defaults: Any) -> inspect.Signature:
    """The command's signature; `defaults` replace a generated option's default by parameter name
    (`fedseek continual`: periods="auto")."""
    generated, extra = options(), run_options()
    unknown = set(defaults) - {o.name for o in generated}
    if unknown:
        raise ValueError(f"no generated option {sorted(unknown)}")
    params = []
    for section in get_type_hints(JobConfig):
        params += [_parameter(o, defaults.get(o.name, o.default)) for o in generated if o.section == section]
        params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=kind)
                   for after, name, kind, info in extra if after == section]
    return inspect.Signature(params, return_annotation=None)


def to_job(values: dict[str, Any]) -> Parsed:
    """The JobConfig the parsed option values describe; ValueError names the flags of a refused value.
    Besides the fields themselves: --seed also seeds LoRA, LoRA alpha = 2 x rank, --no-dp, the Fisher
    pass clips at --clip-norm, --periods auto is the task's scheme, validation splits only with periods."""
    values = dict(values)
    run = {name: values.pop(name) for _, name, _, _ in run_options()}
    generated, given = options(), set()
    sections: dict[str, dict[str, Any]] = {section: {} for section in get_type_hints(JobConfig)}
    for option in generated:
        value = values.pop(option.name)
        if value is None:  # unset: the field's default (or the rule's value)
            continue
        sections[option.section][option.field.name] = value.value if isinstance(value, Enum) else (
            str(value) if isinstance(value, Path) else value)
        if option.field.metadata.get("rule"):
            given.add(option.field.name)
    if values:
        raise ValueError(f"unknown options {sorted(values)}")
    data, lora, privacy = sections["data"], sections["lora"], sections["privacy"]
    if data.get("periods") == "auto":
        from fedseek.data.periods import DEFAULT_SCHEME

        data["periods"] = DEFAULT_SCHEME.get(data["task"], "column")
    if not data.get("periods"):
        data["validation_fraction"] = 0.0
    lora.update(alpha=2.0 * lora["rank"], seed=sections["federation"]["seed"])
    privacy["enabled"] = not run.pop("no_dp")
    sections["fisher"]["clip_norm"] = privacy.get("clip_norm", PrivacySettings().clip_norm)
    job = JobConfig()
    for section, cls in get_type_hints(JobConfig).items():
        try:
            setattr(job, section, cls(**sections[section]))
        except ValueError as err:
            flags = [f"--{o.flag}" for o in generated if o.section == section
                     and re.search(rf"\b{o.field.name}\b", str(err))]
            raise ValueError(f"{err} ({', '.join(flags)})" if flags else str(err)) from None
    return Parsed(job, given, run)
