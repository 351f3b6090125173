"""The one sigma planner: the derivation of a job's training releases (pure: no Flower/MLflow/SQL).

The client (`LocalTrainer.plan_noise`), the coordinator's ledger pre-flight
(`fedseek.platform.store.ledger.planned_releases`) call this, so the sigma a site trains with and the
sigma the ledger projects cannot drift apart. Every training round of a job — a linear-probe round
or a LoRA round of the recipe (`fedseek.clients.recipe`) — releases (sigma, q, local_steps): one
sigma, calibrated for rounds x local_steps steps after the `reserved` releases (a planned DP Fisher
pass), spends exactly the job's epsilon.
"""
from __future__ import annotations

from collections.abc import Iterable

from fedseek.privacy.accountant import default_delta, noise_for_budget


def round_release(privacy, optim, num_records: int, rounds: int,
                  reserved: Iterable[tuple[float, float, int]] = ()) -> tuple[float, float, float]:
    """(sigma, q, delta) of each training round for an institution of `num_records` records.
    `privacy`: PrivacySettings (enabled, target_epsilon, delta, noise_multiplier); `optim`:
    OptimSettings (batch_fraction, local_steps). sigma is 0 without DP."""
    q = min(1.0, optim.batch_fraction)
    delta = privacy.delta or default_delta(num_records)
    if not privacy.enabled:
        return 0.0, q, delta
    if privacy.noise_multiplier is not None:
        return float(privacy.noise_multiplier), q, delta
    return noise_for_budget(privacy.target_epsilon, delta, q, optim.local_steps * rounds,
                            spent=list(reserved)), q, delta


def reserved_releases(job) -> list[tuple[float, float, int]]:
    """The releases a job plans after its training rounds and reserves budget for: its DP Fisher
    pass (continual learning with EWC), as (sigma_F, q_F, 1)."""
    fisher = job.fisher
    return [(fisher.noise_multiplier, fisher.sample_rate, 1)] if job.ewc.uses_fisher and job.ewc.fisher_after else []


def job_round_release(job, num_records: int) -> tuple[float, float, float]:
    """`round_release` for `job` with its reserved releases: what every party plans per round."""
    return round_release(job.privacy, job.optim, num_records, job.federation.rounds, reserved_releases(job))
