"""The site's side of every request: its policy (`site_policy`) checked against what the
coordinator asks, and its own durable history (`site_store`) charged before a reply leaves.

`admit` is called with the releases a request will make now and the rest of the job's plan, before
any record is used; `charge` records what was released. In simulation (no `data-path`) nothing is
stored: the simulated sites belong to the operator and the platform ledger is the budget.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from fedseek.clients.site_policy import PolicyRefusal, SitePolicy
from fedseek.clients.site_store import SiteStore, file_fingerprint, store_path
from fedseek.privacy.accountant import History, default_delta, epsilon
from fedseek.privacy.ledger_math import Release, institution_epsilon

logger = logging.getLogger("fedseek.clients")


@dataclass
class SiteGuard:
    policy: SitePolicy
    store: SiteStore | None  # None: a simulated site
    scope: str  # the data scope of this node's records for the job (ledger key)

    @classmethod
    def for_node(cls, job, node_config: dict) -> "SiteGuard":
        from fedseek.data.plan import data_scope, dataset_fingerprint

        policy = SitePolicy.from_node_config(node_config)
        path = node_config.get("data-path")
        if not path:
            return cls(policy, None, data_scope(job, dataset_fingerprint(job)))
        d = job.data
        policy.check_columns({"data.text_column": d.text_column, "data.label_column": d.label_column,
                              "data.period_column": d.period_column})
        return cls(policy, SiteStore(store_path(node_config)), data_scope(job, "site-" + file_fingerprint(path)))

    def check_request(self, job) -> None:
        """Settings every request must respect, before the node reads its records."""
        if job.privacy.enabled and job.privacy.reproducible_noise and not self.policy.allow_reproducible_noise:
            raise PolicyRefusal("privacy.reproducible_noise", "seeded noise is not private")
        if not job.privacy.enabled and self.policy.require_dp:
            raise PolicyRefusal("privacy.enabled", "the site requires DP (require-dp)")

    def admit(self, num_records: int, done: History, now: History, later: History, delta: float,
              reproducible: bool = False, coordinator_chose: bool = True) -> None:
        """Refuse unless every release in `now` fits the policy (when the coordinator chose its
        sigma and q), and the job's whole plan (`done` earlier in this job, `now`, `later` still to
        come) fits the per-job and lifetime limits."""
        for sigma, q, _ in now if coordinator_chose else []:
            self.policy.check_release(True, sigma, q, reproducible)
        if delta > default_delta(num_records) * (1 + 1e-9):
            raise PolicyRefusal("privacy.delta", f"delta {delta:.3g} > {default_delta(num_records):.3g} "
                                f"for {num_records} records (N*delta must stay small)")
        job_epsilon = epsilon(list(done) + list(now) + list(later), delta)
        if self.store is None:
            self.policy.check_epsilon(job_epsilon, 0.0, 0.0)
            return
        stored = self.store.releases()  # `done` is in here already
        coming = [Release(self.scope, *r) for r in list(now) + list(later)]
        self.policy.check_epsilon(job_epsilon, institution_epsilon(stored + coming, delta),
                                  institution_epsilon(stored, delta))

    def charge(self, kind: str, releases: History, delta: float) -> None:
        if self.store is None:
            return
        for sigma, q, steps in releases:
            self.store.record(kind, Release(self.scope, sigma, q, steps), delta)
        logger.info("charged %s: %s on %s", kind, releases, self.scope)
