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
        from fedseek.platform.jobs import run_deployed

        run_deployed(grid, job, census_timeout=float(run_config.get("census-timeout", 300)),
                     resume_job=int(run_config.get("resume-job", 0) or 0))
    else:
        run_federation(grid, job)


RUN_CONFIG_ALIASES = {
    "task": "data.task", "institutions": "federation.institutions",
    "num-server-rounds": "federation.rounds", "local-steps": "optim.local_steps",
    "epsilon": "privacy.target_epsilon", "dp": "privacy.enabled", "lora-rank": "lora.rank",
    "seed": "federation.seed", "base-model": "federation.base_model", "out": "federation.out",
}


def job_from_run_config(run_config: dict) -> JobConfig:
    if run_config.get("job"):
        return JobConfig.from_flat(json.loads(str(run_config["job"])))
    flat = {RUN_CONFIG_ALIASES.get(k, k): v for k, v in run_config.items()}
    return JobConfig.from_flat(flat)
