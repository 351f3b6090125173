"""An institution's own privacy policy, enforced by its ClientApp whatever the coordinator sends.

The policy lives in the SuperNode's node config (`--node-config "require-dp=true epsilon-budget=6
..."`, set by the site's operator, never by the coordinator). Every request is checked against it
before any record is touched; a refusal reaches the coordinator as `policy-refused: <field>`, and
the site's log keeps the details. The site's lifetime budget is checked against its own durable
history (`fedseek.clients.site_store`), not the coordinator's ledger.

Simulated institutions (no `data-path` in the node config) belong to the operator who runs the
simulation: they enforce the defaults of `SitePolicy.simulation()` — DP may be switched off and
exact validation counts released, because the platform ledger is the only budget there.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

VALIDATION_MODES = ("noised", "exact", "refuse")


class PolicyRefusal(Exception):
    """A request outside the site's policy. `field` names the job setting at fault (sent back);
    `detail` stays in the site's log."""

    def __init__(self, field: str, detail: str):
        super().__init__(f"policy-refused: {field}")
        self.field, self.detail = field, detail


@dataclass(frozen=True)
class SitePolicy:
    """Limits a site sets for itself (node-config keys: the field names with '-' for '_')."""

    require_dp: bool = True  # refuse training, Fisher passes and counts without DP
    epsilon_budget: float = 10.0  # lifetime epsilon over every job this node ever ran
    max_job_epsilon: float = 10.0  # largest epsilon one job may plan
    min_noise_multiplier: float = 0.3  # smallest sigma of any DP-SGD / Fisher step
    max_sample_rate: float = 0.5  # largest Poisson sampling rate q
    allowed_columns: str = ""  # comma-separated columns the coordinator may read ("" = any)
    validation_counts: str = "noised"  # noised (Gaussian, charged) | exact | refuse
    validation_noise: float = 10.0  # sigma (in records) of the Gaussian on a noised count
    allow_reproducible_noise: bool = False  # seeded noise (tests/benchmarks): never in production

    @classmethod
    def from_node_config(cls, node_config: dict) -> "SitePolicy":
        """The policy of this node; simulated nodes get `simulation()`. Unknown values fail clearly."""
        if not node_config.get("data-path"):
            return cls.simulation()
        values = {}
        for item in fields(cls):
            key = item.name.replace("_", "-")
            if key in node_config:
                values[item.name] = _parse(key, node_config[key], item.type)
        policy = cls(**values)
        if policy.validation_counts not in VALIDATION_MODES:
            raise ValueError(f"node config validation-counts={policy.validation_counts!r}: "
                             f"use one of {VALIDATION_MODES}")
        return policy

    @classmethod
    def simulation(cls) -> "SitePolicy":
        return cls(require_dp=False, epsilon_budget=float("inf"), max_job_epsilon=float("inf"),
                   min_noise_multiplier=0.0, max_sample_rate=1.0, validation_counts="noised",
                   allow_reproducible_noise=True)

    def check_columns(self, columns: dict[str, str | None]) -> None:
        """`columns`: job setting -> column name the coordinator asks to read."""
        allowed = {c.strip() for c in self.allowed_columns.split(",") if c.strip()}
        for setting, column in columns.items():
            if column is not None and allowed and column not in allowed:
                raise PolicyRefusal(setting, f"column {column!r} is not in allowed-columns {sorted(allowed)}")

    def check_release(self, dp: bool, sigma: float, q: float, reproducible: bool) -> None:
        """One DP release (a round, a Fisher pass) as the job asks for it."""
        if not dp:
            if self.require_dp:
                raise PolicyRefusal("privacy.enabled", "the site requires DP (require-dp)")
            return
        if reproducible and not self.allow_reproducible_noise:
            raise PolicyRefusal("privacy.reproducible_noise", "seeded noise is not private")
        if sigma < self.min_noise_multiplier:
            raise PolicyRefusal("privacy.noise_multiplier",
                                f"sigma {sigma:.4g} < min-noise-multiplier {self.min_noise_multiplier:g}")
        if q > self.max_sample_rate:
            raise PolicyRefusal("optim.batch_fraction", f"q {q:.4g} > max-sample-rate {self.max_sample_rate:g}")

    def check_epsilon(self, job_epsilon: float, lifetime_after: float, lifetime_before: float) -> None:
        """The job's planned epsilon and the site's lifetime epsilon after it."""
        if job_epsilon > self.max_job_epsilon + 1e-9:
            raise PolicyRefusal("privacy.target_epsilon",
                                f"job epsilon {job_epsilon:.3f} > max-job-epsilon {self.max_job_epsilon:g}")
        if lifetime_after > self.epsilon_budget + 1e-9:
            raise PolicyRefusal("privacy.target_epsilon",
                                f"lifetime epsilon would reach {lifetime_after:.3f} > epsilon-budget "
                                f"{self.epsilon_budget:g} (already spent {lifetime_before:.3f})")


def _parse(key: str, value, kind: str):
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return text in ("true", "1", "yes")
        if kind == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"node config {key}={value!r} is not a valid {kind}") from None
