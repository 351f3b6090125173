"""The `flwr run` entry (`[tool.flwr.app.components] serverapp` in pyproject.toml): the job comes
from the run config; `platform-track = true` (what `fedseek deploy run` sets) runs it through the
platform (census, node identities, ledger pre-flight, DB / MLflow records). The platform is the
composition root: it imports the aggregator, never the other way round."""
from __future__ import annotations

import json

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedseek.aggregator.server_app import run_federation
from fedseek.config import JobConfig

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The run config keys are the `section.field` names of JobConfig, or the short names of
    [tool.flwr.app.config], or the whole flat JobConfig as JSON in `job`."""
    run_config = dict(context.run_config)
    job = job_from_run_config(run_config)
    if run_config.get("platform-track"):
        from fedseek.platform.run.jobs import run_deployed

        run_deployed(grid, job, census_timeout=float(run_config.get("census-timeout", 300)),
                     resume_job=int(run_config.get("resume-job", 0) or 0))
    else:
        run_federation(grid, job)


# keys of the run config that are not job settings (`fedseek deploy run` sets them)
RUN_KEYS = {
    "job": ("", "the whole JobConfig as JSON (`fedseek deploy run` sets it; overrides the tables below)"),
    "platform-track": (False, "record the job in the platform DB, privacy ledger and MLflow"),
    "census-timeout": (300, "seconds to wait for the job's institutions to connect"),
    "resume-job": (0, "a platform job id to resume from its last committed round (`fedseek deploy run --resume`)"),
}


def job_from_run_config(run_config: dict) -> JobConfig:
    """The job of a run config: the whole JobConfig in `job`, else its `section.field` keys (Flower
    flattens the pyproject tables and `--run-config "optim.local_steps=2"` to those keys)."""
    if run_config.get("job"):
        return JobConfig.from_flat(json.loads(str(run_config["job"])))
    return JobConfig.from_flat(run_config)


def run_config_defaults() -> dict:
    """`[tool.flwr.app.config]` as Flower flattens it: RUN_KEYS and every JobConfig setting that a
    run config can carry (bool/int/float/str; None and list settings only through `job`)."""
    settings = {k: v for k, v in JobConfig().to_flat().items() if isinstance(v, (bool, int, float, str))}
    return {**{k: v for k, (v, _) in RUN_KEYS.items()}, **settings}


def pyproject_section() -> str:
    """The `[tool.flwr.app.config]` tables, generated from fedseek/config.py (a default is written once)."""
    def toml(value) -> str:
        return json.dumps(value) if not isinstance(value, bool) else str(value).lower()

    lines = ["[tool.flwr.app.config]  # generated from fedseek/config.py: python -m fedseek.platform.flower_app"]
    lines += [f"{key} = {toml(value)}  # {why}" for key, (value, why) in RUN_KEYS.items()]
    section = None
    for key, value in run_config_defaults().items():
        if key in RUN_KEYS:
            continue
        table, name = key.split(".", 1)
        if table != section:
            lines += ["", f"[tool.flwr.app.config.{table}]"]
            section = table
        lines.append(f"{name} = {toml(value)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # rewrite pyproject.toml's run config from the dataclasses
    from fedseek.resources import PACKAGE_DIR

    path = PACKAGE_DIR.parent / "pyproject.toml"
    text = path.read_text()
    start = text.index("[tool.flwr.app.config]")
    end = text.index("\n[tool.pytest", start) + 1
    path.write_text(text[:start] + pyproject_section() + "\n" + text[end:])
    print(f"wrote [tool.flwr.app.config] of {path}")
