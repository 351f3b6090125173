"""Job configuration: one documented dataclass per concern, flattened to `section.field` keys for
Flower's ConfigRecord / run config and rebuilt on the other side; a field declared with `opt` is also a
`fedseek simulate` option. A leaf: it imports nothing from fedseek (no Opacus, Flower or torch for a
reader of a job). What a setting *does* lives with its concern; data functions: fedseek.data.plan."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

PERIOD_SEPARATOR = "|"  # between period names of a joint job
# the choices of a setting (the CLI offers only these; __post_init__ refuses others where it checks)
PARTITIONS, RECIPES = ("iid", "dirichlet"), ("probe", "lora")  # data.partition, recipe.name
OBJECTIVES, DTYPES, QUANTIZE = ("classify", "causal-lm"), ("auto", "fp32", "bf16"), ("none", "4bit", "8bit")
GENERATIVE_TASKS = ("banking77-gen", "pubmedqa-gen")  # shipped (prompt, response) tasks: causal-lm
CODECS, RULES = ("none", "fp16", "int8", "int4"), ("fedavg", "trimmed-mean", "median")  # compression, robust
METHODS, GRANULARITIES = ("naive", "ewc", "online-ewc", "joint"), ("tensor", "row", "coordinate")  # ewc, fisher


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def opt(default: Any, help: str, flag: str = "", **cli: Any) -> Any:
    """A field that is also a `fedseek simulate` option (fedseek.platform.cli.options): `flag` (default: the name,
    dashed), `help` ("{default}" filled in), `cli`: typer's min/max, choices, path=True, cli_default (the command's
    own default), rule=True (unset unless given: a recipe's rule fills it)."""
    return field(default=default, metadata={"help": help, "flag": flag, **cli})


@dataclass
class DataSettings:
    """Where each institution's records come from and how they are split."""

    task: str = opt("banking77", "Shipped task: banking77 | medical_abstracts | pubmedqa | banking77-gen | pubmedqa-gen.")
    objective: str = opt("classify", "classify (label a text) or causal-lm (answer a prompt).", choices=OBJECTIVES)
    data: str | None = opt(None, "Your CSV/JSONL file, partitioned across institutions.", path=True)
    data_dir: str | None = opt(None, "Directory with one CSV/JSONL per institution (+ optional test.*).", path=True)
    test_data: str | None = opt(None, "Global test file for --data (default: 20% stratified hold-out).", path=True)
    text_column: str = opt("text", "Column holding the text.")
    label_column: str = opt("label", "Column holding the label (causal-lm: optional, used to partition).")
    prompt_column: str = opt("prompt", "causal-lm: column holding the prompt.")
    response_column: str = opt("response", "causal-lm: column holding the response (the only tokens trained).")
    encoding: str = opt("utf-8", "Text encoding of your data files, e.g. latin-1 or cp1252 (a Python codec name).")
    partition: str = opt("iid", "How records are split across institutions.", choices=PARTITIONS)
    alpha: float = opt(0.5, "Dirichlet concentration for --partition dirichlet.", min=1e-3)  # smaller: more non-IID
    max_length: int = opt(64, "Tokens per record (default: the rule's; lora: {default}).", rule=True, min=8)
    response_tokens: int = opt(32, "causal-lm: response tokens trained and generated (default: the task's).",
                               rule=True, min=2)
    max_train_rows: int = opt(0, "Use at most this many training rows in total (0 = all).", min=0)
    max_test_rows: int = opt(0, "Evaluate on a seeded random subset of this many test rows (0 = all).", min=0)
    periods: str = opt("", "Continual learning: period scheme years | intent-groups | condition-groups | column "
                       "| auto (the task's default); one federated job per period.")  # fedseek.data.periods
    period: str = ""  # the period(s) this job trains on, "|"-separated (several: joint training)
    period_column: str | None = opt(None, "Column of your data holding each row's date or period id.")
    period_freq: str = opt("", "With --period-column of ISO dates: year | quarter.")  # "": period ids, no dates
    period_groups: int = opt(3, "Label groups for intent-groups / condition-groups.", min=2)
    validation_fraction: float = opt(0.0, "With --periods: records each institution holds out for λ selection.",
                                     cli_default=0.1, min=0.0, max=0.5)  # the CLI sets it only with --periods

    @property
    def period_scope(self) -> str:
        """The slice of records this job touches within its period scheme: one period's name, or
        "all" (no periods, or joint training over several). The ledger's scope is `data_scope`."""
        names = [p for p in self.period.split(PERIOD_SEPARATOR) if p]
        return names[0] if len(names) == 1 else "all"

    @property
    def causal_lm(self) -> bool:
        """(prompt, response) records trained with next-token loss on the response."""
        return self.objective == "causal-lm" or (not self.data and not self.data_dir and self.task in GENERATIVE_TASKS)

    @property
    def slicing_scheme(self) -> str:
        """The period scheme with every parameter that decides which records fall in a period:
        only slices of one scheme (same parameters) over one dataset are disjoint."""
        if not self.periods:
            return "none"
        params = (f"groups={self.period_groups},labels={self.label_column}"  # label ids: positions in its set
                  if self.periods in ("intent-groups", "condition-groups")
                  else f"column={self.period_column or ''},freq={self.period_freq}")
        return f"{self.periods}({params})"


@dataclass
class FederationSettings:
    """The federated job as a whole."""

    institutions: int = opt(3, "Simulated institutions (ignored with --data-dir).", min=1)
    rounds: int = opt(5, "Federated rounds.", min=1)
    seed: int = opt(0, "Seed for partitioning, sampling and LoRA init.")  # the CLI's --seed is lora.seed too
    base_model: str | None = opt(None, "Local checkpoint (DeepSeek-V2/V3, R1-Distill); default: embedded.", path=True)
    out: str = opt("runs/latest", "Output directory (report.json, adapter/).", path=True)
    study: str = ""  # a comparison/tuning arm's name; every arm is charged to the same institutions' ledger
    min_institutions: int = 0  # a round completes with this many updates (0 = all institutions)
    round_timeout: float = 3600.0  # seconds a round waits for replies before going on without them
    rejoin_wait: float = 30.0  # with min_institutions: seconds a round start waits for offline institutions
    dtype: str = opt("auto", "Base weights' dtype: bf16 | fp32 (auto: bf16 on a GPU that has it).", choices=DTYPES)
    quantize: str = opt("none", "causal-lm: 4bit | 8bit bitsandbytes base (QLoRA; CUDA only).", choices=QUANTIZE)


@dataclass
class LoraSettings:
    """LoRA adapter settings shared by every institution of a job (the CLI sets alpha = 2 x rank)."""

    rank: int = opt(16, "LoRA rank r.", "lora-rank", min=1)
    alpha: float = 32.0
    targets: str = opt("attention", "'attention', 'attention+mlp' or comma-separated module names.", "lora-targets")
    top_layers: int = opt(1, "Adapt only the top N decoder layers (0 = all).", "lora-layers", min=0)
    ffa: bool = opt(False, "FFA-LoRA: freeze A at a shared seed, train/send only B.")
    seed: int = 0  # shared seed: identical A matrices at every institution
    extra_trainable: list[str] = field(default_factory=lambda: ["score"])  # task head


@dataclass
class PrivacySettings:
    """Record-level DP of one institution for the whole job (the CLI's --no-dp turns `enabled` off)."""

    enabled: bool = True
    target_epsilon: float = opt(8.0, "Privacy budget per institution for the whole job.", "epsilon", min=0.01)
    delta: float | None = opt(None, "delta (default min(1e-5, 0.01/N) per institution: N·delta <= 0.01).")
    noise_multiplier: float | None = opt(None, "Give sigma directly instead of deriving it from --epsilon.")
    clip_norm: float = opt(1.0, "Per-sample gradient clipping norm C (default: the rule; lora: {default}).",
                           rule=True, min=1e-6)
    # seeded noise is NOT private (the coordinator can regenerate it): tracked and deployed jobs refuse it
    reproducible_noise: bool = opt(False, "Seed DP noise and sampling from --seed (tests/benchmarks only: NOT "
                                   "private; tracked jobs refuse it unless FEDSEEK_ALLOW_REPRODUCIBLE_NOISE=1).")

    @property
    def private_noise(self) -> bool:
        return self.enabled and not self.reproducible_noise


@dataclass
class OptimSettings:
    """Local optimisation; the learning-rate schedule spans the whole job (all rounds)."""

    local_steps: int = opt(12, "DP-SGD steps per institution per round (default: the recipe's rule; "
                           "lora: {default}).", rule=True, min=1)  # logical (noised) steps
    batch_fraction: float = opt(0.125, "Poisson sampling rate q, expected batch q*N (default: the rule; "
                                "lora: {default}).", rule=True, min=1e-4, max=1.0)  # large: less noise per signal
    learning_rate: float = opt(2e-2, "Peak Adam learning rate of LoRA rounds (warmup, then cosine; default: "
                               "the rule's, lora: {default}).", rule=True, min=0.0)
    warmup_fraction: float = 0.05
    schedule: str = "cosine"  # cosine | constant (both after linear warmup)
    chunk_size: int = opt(256, "Records per physical batch: bounds memory, not the math (DP: virtual steps).", min=1)


@dataclass
class RecipeSettings:
    """Which DP recipe a job trains with; `probe_rounds` < 0 means "all rounds" (the rule's value)."""

    name: str = opt("lora", "DP recipe: probe = DP head on every layer's pooled states, then optional LoRA "
                    "(fedseek.clients.recipe); lora = LoRA + last-layer head (causal-lm: always).", "recipe",
                    choices=RECIPES, cli_default="probe")
    probe_rounds: int = opt(-1, "probe recipe: head-only rounds before LoRA rounds (default: all).",
                            rule=True, min=0)  # head-only rounds at the start; -1 = every round
    probe_lr: float = 1e-2  # Adam learning rate of the head-only phase (the rule's value, fedseek.clients.recipe)
    components: int = 0  # public principal directions the head reads (0: all shipped, 256)

    @property
    def pooling(self) -> str:
        return "layers" if self.name == "probe" else "last"


@dataclass
class CompressionSettings:
    """How institutions encode their adapter updates for upload."""

    codec: str = opt("none", "Upload adapter deltas as fp16, int8 or int4 (per-channel scales) instead of float32.",
                     "compression", choices=CODECS)
    topk: float = opt(0.0, "Upload only this fraction of each delta's largest entries (0 = all; error feedback "
                      "keeps the rest).", min=0.0, max=0.99)
    error_feedback: bool = True  # carry the encoding error into the next round's delta

    @property
    def enabled(self) -> bool:
        """True when updates travel as encoded deltas (anything but plain float32 tensors)."""
        return self.codec != "none" or self.topk > 0

    def __post_init__(self):
        _check(self.codec in CODECS, f"unknown compression codec {self.codec!r}; choose one of {CODECS}")
        _check(0.0 <= self.topk < 1.0, f"topk must be a fraction in [0, 1), got {self.topk}")


@dataclass
class RobustSettings:
    """How the coordinator bounds and combines institutions' updates."""

    rule: str = opt("fedavg", "How the server combines updates: fedavg | trimmed-mean | median (coordinate-wise, "
                    "against poisoned updates).", "robust", choices=RULES)
    trim_fraction: float = opt(0.2, "trimmed-mean: fraction cut from each end.", min=0.0, max=0.49)  # per coordinate
    clip_norm: float = opt(0.0, "Bound each update's delta to this L2 norm on the server (0 = off).", "server-clip",
                           min=0.0)
    max_update_bytes: int = 0  # reject larger replies; 0 = 2x the global adapter's size + 64 KiB
    outlier_ratio: float = opt(0.0, "Reject updates whose norm exceeds this multiple of the round's median "
                               "(0 = off; needs >= 3 institutions).", min=0.0)

    def __post_init__(self):
        _check(self.rule in RULES, f"unknown aggregation rule {self.rule!r}; choose one of {RULES}")
        _check(0.0 <= self.trim_fraction < 0.5, f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        _check(min(self.clip_norm, self.max_update_bytes, self.outlier_ratio) >= 0,
               "clip_norm, max_update_bytes and outlier_ratio must be >= 0")
        _check(not 0 < self.outlier_ratio <= 1, f"outlier_ratio must be > 1 (or 0 = off), got {self.outlier_ratio}")


@dataclass
class EWCSettings:
    """Continual-learning method and its EWC hyper-parameters."""

    method: str = opt("ewc", "Continual method (with --periods); joint = one job on all periods (upper bound).", "cl",
                      choices=METHODS)
    lam: float = opt(1.0, "EWC strength λ (Fisher normalised to mean 1).", "ewc-lambda", min=0.0)
    gamma: float = opt(0.9, "Online-EWC decay γ of the running Fisher.", "ewc-gamma", min=0.0, max=1.0)
    fisher_after: bool = False  # this job ends with a Fisher pass (planned into its ε budget)

    def __post_init__(self) -> None:
        _check(self.method in METHODS, f"continual method {self.method!r} is not one of {METHODS}")
        _check(self.lam >= 0 and 0 <= self.gamma <= 1, "EWC needs lambda >= 0 and 0 <= gamma <= 1")

    @property
    def uses_fisher(self) -> bool:
        return self.method in ("ewc", "online-ewc")


@dataclass
class FisherSettings:
    """The DP Fisher pass an institution runs at the end of a period (noise std σ_F · C² on group sums)."""

    sample_rate: float = opt(0.5, "Poisson rate of the DP Fisher pass.", "fisher-rate", min=1e-4, max=1.0)  # q_F
    noise_multiplier: float = opt(10.0, "Noise multiplier σ_F of the DP Fisher pass.", "fisher-noise", min=0.0)
    clip_norm: float = 1.0  # C: per-record gradient norm bound
    granularity: str = opt("tensor", "Fisher values released per tensor | row | coordinate.", "fisher-granularity",
                           choices=GRANULARITIES)

    def __post_init__(self) -> None:
        _check(self.granularity in GRANULARITIES, f"fisher granularity {self.granularity!r} is not one of {GRANULARITIES}")
        _check(0 < self.sample_rate <= 1 and self.noise_multiplier >= 0 and self.clip_norm > 0,
               "fisher needs 0 < sample_rate <= 1, noise_multiplier >= 0, clip_norm > 0")


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
        return {f"{section.name}.{key}": value for section in dataclasses.fields(self)
                for key, value in dataclasses.asdict(getattr(self, section.name)).items() if value is not None}

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> "JobConfig":
        """Inverse of `to_flat`; unknown keys are ignored, missing keys keep their defaults."""
        job = cls()
        for section in dataclasses.fields(job):
            settings = getattr(job, section.name)
            for item in dataclasses.fields(settings):
                value = flat.get(f"{section.name}.{item.name}", getattr(settings, item.name))
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
    kind, *others = [k.strip() for k in str(declared).split("|")]
    if "None" in others and text.lower() in ("", "none"):
        return None
    try:
        if kind == "bool":
            return {"true": True, "1": True, "false": False, "0": False}[text.lower()]
        if kind.startswith("list"):
            return [part.strip() for part in text.split(",") if part.strip()]
        return {"int": int, "float": float}.get(kind, str)(text)
    except (KeyError, ValueError):
        raise ValueError(f"--set {item!r}: {text!r} is not a valid {kind}") from None

