"""Job configuration: one documented dataclass per concern, flattened to `section.field` keys for
Flower's ConfigRecord / run config and rebuilt on the other side.

A leaf module: it imports nothing from fedseek, so every reader of a job (the coordinator, a site,
the CLI, the ledger) gets the settings without pulling in Opacus, Flower or torch. What a setting
*does* lives with its concern (fedseek.clients.dp_trainer, fedseek.aggregator.robust, ...); the
data functions that read a job's records are in fedseek.data.plan.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

PERIOD_SEPARATOR = "|"  # between period names of a joint job
# the choices of a setting (the CLI shows them; __post_init__/check refuse anything else)
PARTITIONS = ("iid", "dirichlet")  # data.partition
CODECS = ("none", "fp16", "int8", "int4")  # compression.codec
RULES = ("fedavg", "trimmed-mean", "median")  # robust.rule
METHODS = ("naive", "ewc", "online-ewc", "joint")  # ewc.method
GRANULARITIES = ("tensor", "row", "coordinate")  # fisher.granularity
RECIPES = ("probe", "lora")  # recipe.name


@dataclass
class DataSettings:
    """Where each institution's records come from and how they are split."""

    task: str = "banking77"  # shipped task, used when neither `data` nor `data_dir` is given
    data: str | None = None  # one CSV/JSONL file partitioned across institutions
    data_dir: str | None = None  # one file per institution (+ optional test.*)
    test_data: str | None = None  # global test file for `data` (else a stratified hold-out)
    text_column: str = "text"
    label_column: str = "label"
    partition: str = "iid"  # iid | dirichlet
    alpha: float = 0.5  # Dirichlet concentration (smaller = more non-IID)
    max_length: int = 64  # tokens per record
    max_train_rows: int = 0  # cap on the pooled training rows (0 = all); for quick runs
    periods: str = ""  # continual-learning period scheme (fedseek.data.periods); "" = no periods
    period: str = ""  # the period(s) this job trains on, "|"-separated (several: joint training)
    period_column: str | None = None  # user data: column holding each row's date or period id
    period_freq: str = ""  # "", year or quarter: map ISO dates in period_column to periods
    period_groups: int = 3  # label groups for the intent-/condition-groups schemes
    validation_fraction: float = 0.0  # held out of each institution's records (λ selection)

    @property
    def period_scope(self) -> str:
        """The slice of records this job touches within its period scheme: one period's name, or
        "all" (no periods, or joint training over several). The ledger's scope is `data_scope`."""
        names = [p for p in self.period.split(PERIOD_SEPARATOR) if p]
        return names[0] if len(names) == 1 else "all"

    @property
    def slicing_scheme(self) -> str:
        """The period scheme with every parameter that decides which records fall in a period:
        only slices of one scheme (same parameters) over one dataset are disjoint."""
        if not self.periods:
            return "none"
        if self.periods in ("intent-groups", "condition-groups"):  # label ids: positions in the label column's set
            params = f"groups={self.period_groups},labels={self.label_column}"
        else:
            params = f"column={self.period_column or ''},freq={self.period_freq}"
        return f"{self.periods}({params})"


@dataclass
class FederationSettings:
    """The federated job as a whole."""

    institutions: int = 3
    rounds: int = 5
    seed: int = 0
    base_model: str | None = None  # local checkpoint directory; None = embedded default
    out: str = "runs/latest"
    study: str = ""  # a comparison/tuning arm's name; every arm is charged to the same institutions' ledger
    min_institutions: int = 0  # a round completes with this many updates (0 = all institutions)
    round_timeout: float = 3600.0  # seconds a round waits for replies before going on without them
    rejoin_wait: float = 30.0  # with min_institutions: seconds a round start waits for offline institutions


@dataclass
class LoraSettings:
    """LoRA adapter settings shared by every institution of a job."""

    rank: int = 16
    alpha: float = 32.0
    targets: str = "attention"  # preset name, or comma-separated module names
    top_layers: int = 1  # adapt only the last N decoder layers (0 = all); lower layers stay frozen
    ffa: bool = False  # FFA-LoRA: A frozen at its seeded init, only B (+ head) trained and sent
    seed: int = 0  # shared seed: identical A matrices at every institution
    extra_trainable: list[str] = field(default_factory=lambda: ["score"])  # task head


@dataclass
class PrivacySettings:
    """Record-level DP of one institution for the whole job."""

    enabled: bool = True
    target_epsilon: float = 8.0  # budget for the whole job (all rounds)
    delta: float | None = None  # None: min(1e-5, 0.01/N) for the institution's N records (N*delta <= 0.01)
    noise_multiplier: float | None = None  # given sigma overrides the target-epsilon derivation
    clip_norm: float = 1.0  # per-sample gradient clipping bound C
    # seeded DP noise and sampling, for tests and benchmarks only: the job is then NOT private
    # (the coordinator can regenerate the noise); tracked and deployed jobs refuse it
    reproducible_noise: bool = False

    @property
    def private_noise(self) -> bool:
        return self.enabled and not self.reproducible_noise


@dataclass
class OptimSettings:
    """Local optimisation; the learning-rate schedule spans the whole job (all rounds)."""

    local_steps: int = 12  # logical (noised) steps per round
    batch_fraction: float = 0.125  # expected batch = q * N (large batches: lower noise per signal)
    learning_rate: float = 2e-2  # high for DP: noisy Adam steps need it (BENCHMARKS.md sweep)
    warmup_fraction: float = 0.05
    schedule: str = "cosine"  # cosine | constant (both after linear warmup)
    chunk_size: int = 256  # physical batch: bounds memory, not the math


@dataclass
class RecipeSettings:
    """Which DP recipe a job trains with; `probe_rounds` < 0 means "all rounds" (the rule's value)."""

    name: str = "lora"  # probe | lora (library default: the old recipe; `fedseek simulate`: probe)
    probe_rounds: int = -1  # head-only rounds at the start (probe recipe); -1 = every round
    probe_lr: float = 1e-2  # Adam learning rate of the head-only phase (the rule's value, fedseek.clients.recipe)
    components: int = 0  # public principal directions the head reads (0: all shipped, 256)

    @property
    def pooling(self) -> str:
        return "layers" if self.name == "probe" else "last"

    def check(self) -> None:
        if self.name not in RECIPES:
            raise ValueError(f"recipe.name {self.name!r} is not one of {list(RECIPES)}")


@dataclass
class CompressionSettings:
    """How institutions encode their adapter updates for upload."""

    codec: str = "none"  # none | fp16 | int8 | int4
    topk: float = 0.0  # keep this fraction of each tensor's delta entries (0 = all)
    error_feedback: bool = True  # carry the encoding error into the next round's delta

    @property
    def enabled(self) -> bool:
        """True when updates travel as encoded deltas (anything but plain float32 tensors)."""
        return self.codec != "none" or self.topk > 0

    def __post_init__(self):
        if self.codec not in CODECS:
            raise ValueError(f"unknown compression codec {self.codec!r}; choose one of {CODECS}")
        if not 0.0 <= self.topk < 1.0:
            raise ValueError(f"topk must be a fraction in [0, 1), got {self.topk}")


@dataclass
class RobustSettings:
    """How the coordinator bounds and combines institutions' updates."""

    rule: str = "fedavg"  # fedavg | trimmed-mean | median
    trim_fraction: float = 0.2  # trimmed-mean: fraction cut from each end of every coordinate
    clip_norm: float = 0.0  # server-side L2 bound on each update's delta (0 = off)
    max_update_bytes: int = 0  # reject larger replies; 0 = 2x the global adapter's size + 64 KiB
    outlier_ratio: float = 0.0  # reject deltas with norm > ratio x the round's median (0 = off)

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown aggregation rule {self.rule!r}; choose one of {RULES}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        if self.clip_norm < 0 or self.max_update_bytes < 0 or self.outlier_ratio < 0:
            raise ValueError("clip_norm, max_update_bytes and outlier_ratio must be >= 0")
        if 0 < self.outlier_ratio <= 1:
            raise ValueError(f"outlier_ratio must be > 1 (or 0 = off), got {self.outlier_ratio}")


@dataclass
class EWCSettings:
    """Continual-learning method and its EWC hyper-parameters."""

    method: str = "ewc"  # naive | ewc (separate) | online-ewc | joint (all periods so far: upper bound)
    lam: float = 1.0  # λ; the Fisher is normalised to mean 1, so λ is comparable across models
    gamma: float = 0.9  # online-EWC decay of the running Fisher
    fisher_after: bool = False  # this job ends with a Fisher pass (planned into its ε budget)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"continual method {self.method!r} is not one of {METHODS}")
        if self.lam < 0 or not 0 <= self.gamma <= 1:
            raise ValueError("EWC needs lambda >= 0 and 0 <= gamma <= 1")

    @property
    def uses_fisher(self) -> bool:
        return self.method in ("ewc", "online-ewc")


@dataclass
class FisherSettings:
    """The DP Fisher pass an institution runs at the end of a period."""

    sample_rate: float = 0.5  # Poisson rate q_F of the single Fisher pass
    noise_multiplier: float = 10.0  # σ_F; noise std on the group sums is σ_F · C²
    clip_norm: float = 1.0  # C: per-record gradient norm bound
    granularity: str = "tensor"  # tensor | row | coordinate

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"fisher granularity {self.granularity!r} is not one of {GRANULARITIES}")
        if not 0 < self.sample_rate <= 1 or self.noise_multiplier < 0 or self.clip_norm <= 0:
            raise ValueError("fisher needs 0 < sample_rate <= 1, noise_multiplier >= 0, clip_norm > 0")


@dataclass
class JobConfig:
    data: DataSettings = field(default_factory=DataSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)
    ewc: EWCSettings = field(default_factory=lambda: EWCSettings(method="naive"))
    fisher: FisherSettings = field(default_factory=FisherSettings)
    compression: CompressionSettings = field(default_factory=CompressionSettings)
    robust: RobustSettings = field(default_factory=RobustSettings)
    recipe: RecipeSettings = field(default_factory=RecipeSettings)

    def to_flat(self) -> dict[str, Any]:
        """`section.field` -> value; None values are left out (ConfigRecord has no None)."""
        flat: dict[str, Any] = {}
        for section in dataclasses.fields(self):
            for key, value in dataclasses.asdict(getattr(self, section.name)).items():
                if value is not None:
                    flat[f"{section.name}.{key}"] = value
        return flat

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> "JobConfig":
        """Inverse of `to_flat`; unknown keys are ignored, missing keys keep their defaults."""
        job = cls()
        for section in dataclasses.fields(job):
            settings = getattr(job, section.name)
            for item in dataclasses.fields(settings):
                key = f"{section.name}.{item.name}"
                if key in flat:
                    value = flat[key]
                    setattr(settings, item.name, list(value) if isinstance(value, (list, tuple)) else value)
        return job

    def with_overrides(self, items: list[str]) -> "JobConfig":
        """A copy with `section.field=value` items applied (`deploy run --set`), each value parsed by
        its field's declared type; ValueError names the item that is not a known field or value."""
        flat = self.to_flat()
        types = {f"{s.name}.{f.name}": f.type for s in dataclasses.fields(self)
                 for f in dataclasses.fields(getattr(self, s.name))}
        for item in items:
            key, sep, text = item.partition("=")
            if not sep or key not in types:
                raise ValueError(f"--set {item!r}: expected section.field=value with a known field "
                                 f"(e.g. optim.learning_rate=0.01)")
            flat[key] = _parse(types[key], text, item)
        return JobConfig.from_flat(flat)


def _parse(declared: str, text: str, item: str):
    """`text` as the declared type (a string annotation: int, float, bool, str, list[str], X | None)."""
    kinds = [k.strip() for k in str(declared).split("|")]
    if "None" in kinds and text.lower() in ("", "none"):
        return None
    kind = kinds[0]
    try:
        if kind == "bool":
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if kind in ("int", "float"):
            return {"int": int, "float": float}[kind](text)
        if kind.startswith("list"):
            return [part.strip() for part in text.split(",") if part.strip()]
        return text
    except ValueError:
        raise ValueError(f"--set {item!r}: {text!r} is not a valid {kind}") from None

