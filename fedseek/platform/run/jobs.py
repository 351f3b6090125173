"""Run a federated job with platform tracking: pre-flight budget check before Ray starts, then
the simulation with a PlatformReporter around the caller's reporter."""
from __future__ import annotations

import copy

from fedseek.config import JobConfig
from fedseek.data.plan import federated_data


class PlatformUnavailable(ValueError):
    """The platform DB cannot be reached: nothing was trained."""


def run_job(job: JobConfig, inner=None, verbose: bool = False, track: bool = True, settings=None,
            **simulate_options):
    """Run `job`; with `track`, refuse it (ledger.BudgetExceeded) if any institution would exceed
    its privacy budget, and record it in the platform DB and MLflow. `simulate_options` go to
    `fedseek.platform.run.simulation.simulate`."""
    from fedseek.platform.run.simulation import simulate

    if not track:
        return simulate(job, inner, verbose=verbose, **simulate_options)
    refuse_reproducible_noise(job, settings, deployed=False)
    from fedseek.platform.run.reporter import PlatformReporter

    from sqlalchemy.exc import OperationalError

    reporter = PlatformReporter(inner, settings)
    try:
        if job.data.periods:  # continual: each period is a platform job; check the first one now
            from fedseek.config import PERIOD_SEPARATOR
            from fedseek.data.plan import job_data, period_names

            first = copy.deepcopy(job)
            names = period_names(job)
            first.data.period = PERIOD_SEPARATOR.join(names) if job.ewc.method == "joint" else names[0]
            reporter.preflight(first, job_data(first))
        else:
            reporter.preflight(job, federated_data(job))
    except OperationalError as err:
        raise PlatformUnavailable(f"platform DB unreachable ({str(err.orig).splitlines()[0][:300]}); fix "
                                  "FEDSEEK_DB_URL or run with --no-track") from None
    try:
        return simulate(job, reporter, verbose=verbose, **simulate_options)
    except BaseException as err:
        reporter.fail(str(err) or type(err).__name__)
        raise


def refuse_reproducible_noise(job: JobConfig, settings=None, deployed: bool = True) -> None:
    """Seeded DP noise (privacy.reproducible_noise) is not private: deployed jobs never use it,
    tracked simulations only on a platform with FEDSEEK_ALLOW_REPRODUCIBLE_NOISE=1 (tests)."""
    if not (job.privacy.enabled and job.privacy.reproducible_noise):
        return
    from fedseek.platform.store.settings import load_settings

    if deployed or not (settings or load_settings()).allow_reproducible_noise:
        where = "deployed jobs" if deployed else "tracked jobs (FEDSEEK_ALLOW_REPRODUCIBLE_NOISE is off)"
        raise ValueError(f"privacy.reproducible_noise: seeded DP noise is not private and {where} refuse it; "
                         "drop --reproducible-noise, or use --no-track for a test or benchmark")


def resume_job(job_id: int, inner=None, verbose: bool = False, force: bool = False, settings=None,
               **simulate_options) -> dict:
    """Continue simulated job `job_id` from its last committed round (see fedseek.platform.store.resume)."""
    from fedseek.aggregator.server_app import run_federation
    from fedseek.platform.run.reporter import PlatformReporter
    from fedseek.platform.store.resume import ResumeError, load_resume_point
    from fedseek.platform.store.settings import load_settings
    from fedseek.platform.run.simulation import simulate

    settings = settings or load_settings()
    point = load_resume_point(settings, job_id, force)
    if point.runner != "simulate":
        raise ResumeError(f"job {job_id} ran on the deployed federation: resume it there with "
                          f"`fedseek deploy run --resume {job_id} --superlink ...`")
    reporter = PlatformReporter(inner, settings)
    reporter.attach(point)
    try:
        return simulate(point.job, reporter, verbose=verbose,
                        run=lambda grid, job, rep: run_federation(grid, job, rep, resume=point), **simulate_options)
    except BaseException as err:
        reporter.fail(str(err) or type(err).__name__)
        raise


def run_deployed(grid, job: JobConfig, census_timeout: float = 300.0, settings=None, resume_job: int = 0) -> dict:
    """The ServerApp side of `fedseek deploy run`: census of the connected institutions, node
    identity check, privacy pre-flight from the census counts (or, with `resume_job`, the
    interrupted job's state from the platform DB), then the tracked federated job."""
    from fedseek.aggregator.server_app import CensusError, census, run_federation
    from fedseek.platform.store.nodes import registered_but_offline, verify_node_identities
    from fedseek.platform.run.reporter import PlatformReporter
    from fedseek.platform.store.resume import load_resume_point

    reporter = PlatformReporter(None, settings, runner="deploy")
    point = load_resume_point(reporter.settings, resume_job) if resume_job else None
    if point and point.runner != "deploy":
        from fedseek.platform.store.resume import ResumeError

        raise ResumeError(f"job {resume_job} was simulated: resume it with `fedseek jobs resume {resume_job}`")
    job = point.job if point else job
    refuse_reproducible_noise(job, deployed=True)
    try:
        sites, node_ids = census(grid, job, census_timeout)
    except CensusError as err:
        missing = registered_but_offline(reporter.db, err.online) if err.online is not None else []
        if missing:  # the operator's next step: which institutions' SuperNodes to check
            raise CensusError(f"{err}; registered but not connected: {', '.join(missing)}", err.online) from None
        raise
    verify_node_identities(reporter.db, node_ids)
    if point:
        reporter.attach(point)
    else:
        reporter.preflight(job, sites)
    try:
        return run_federation(grid, job, reporter, sites=sites, nodes={n: name for name, n in node_ids.items()},
                              resume=point)
    except BaseException as err:
        reporter.fail(str(err) or type(err).__name__)
        raise
