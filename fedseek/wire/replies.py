"""What an institution's ClientApp replies, written once for both sides.

One frozen dataclass per reply kind: `TrainReply` (`train`), `FisherReply` (`train.fisher`),
`ValidationReply` (`evaluate.validation`) and `CensusReply` (`query.census`). The site builds its
Flower records with `to_records()`; the coordinator reads them back with `parse(content)` /
`from_message(message)`, which raises `ReplyError` naming the key for anything a correct client
never sends: a required key or record missing, a value of the wrong type, a non-finite number, a
negative or fractional count.

On the wire a field's key is its name with `-` for `_` (`num_examples` -> `num-examples`) in the
`metrics` MetricRecord; `institution` travels in the `site` ConfigRecord (key `site.institution` in
errors) and tensors in the `arrays` ArrayRecord. The coordinator's round log uses the field names
(`reported`). The privacy claims of a train or Fisher reply (σ, q, steps, δ: `CLAIMS`) are not
refused here: the coordinator charges a missing or invalid claim at its own plan
(`fedseek.aggregator.reply_trust`); `claim_ok` says which values are valid claims.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import ClassVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

ARRAYS, METRICS, SITE, INSTITUTION = "arrays", "metrics", "site", "institution"
MAX_STEPS = 10**7  # a larger step count is not a plausible claim
MAX_RECORDS = 10**9  # a larger record count is not a plausible census answer
MAX_NAME = 200  # the longest institution name a census accepts
MAX_RELEASE_STEPS = 10**6  # a validation release of more steps is not plausible

_WHOLE = lambda v: v == int(v)  # noqa: E731
RULES = {  # kind -> (what a valid value is, the test on a finite float)
    "number": ("a number", None),  # NaN allowed: a figure not released (a DP training loss)
    "weight": ("a positive finite count", lambda v: v > 0),
    "records": (f"a whole number of records in 1..{MAX_RECORDS:.0e}", lambda v: _WHOLE(v) and 1 <= v <= MAX_RECORDS),
    "count": ("a whole, finite count >= 0", lambda v: _WHOLE(v) and v >= 0),
    "sigma": ("a finite noise multiplier >= 0", lambda v: v >= 0),
    "noise": ("a finite noise multiplier > 0", lambda v: v > 0),
    "rate": ("a sample rate in (0, 1]", lambda v: 0 < v <= 1),
    "delta": ("a delta in (0, 1)", lambda v: 0 < v < 1),
    "steps": (f"a whole number of steps in 0..{MAX_STEPS:.0e}", lambda v: _WHOLE(v) and 0 <= v <= MAX_STEPS),
    "release": (f"a whole number of steps in 1..{MAX_RELEASE_STEPS:.0e}",
                lambda v: _WHOLE(v) and 1 <= v <= MAX_RELEASE_STEPS),
    "name": (f"a non-empty printable name of at most {MAX_NAME} characters", None),
    "label": ("a claimed name (only compared with the bound one)", None),
}


class ReplyError(ValueError):
    """A reply a correct client never sends; `key` names the field as it travels."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key} {problem}")
        self.key, self.problem = key, problem


def wire_key(name: str) -> str:
    """A field's key in the `metrics` record: `num_examples` -> `num-examples`."""
    return name.replace("_", "-")


def field_name(key: str) -> str:
    """A `metrics` key's field name (the round log's key): `num-examples` -> `num_examples`."""
    return key.replace("-", "_")


def _shown(value) -> str:
    return "missing" if value is None else repr(value)[:40]


def problem(kind: str, value) -> str | None:
    """Why `value` is no valid `kind` (a key of RULES), or None if it is."""
    rule, test = RULES[kind]
    if kind == "label":
        return None
    if kind == "name":
        ok = isinstance(value, str) and value.strip() and len(value) <= MAX_NAME and value.isprintable()
    else:
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and (
            test is None or (math.isfinite(value) and test(float(value))))
    return None if ok else f"must be {rule}, got {_shown(value)}"


def _f(kind: str, *default):
    """A reply field of `kind`; without a default it is required."""
    return field(metadata={"kind": kind}, **({"default": default[0]} if default else {}))


@dataclass(frozen=True)
class _Reply:
    CLAIMS: ClassVar[tuple[str, ...]] = ()  # privacy claims: judged against the plan, not refused
    NEEDS_ARRAYS: ClassVar[bool] = False

    def to_records(self, arrays: ArrayRecord | None = None) -> RecordDict:
        """The reply's Flower records (fields left None are not sent)."""
        metrics = {wire_key(f.name): getattr(self, f.name) for f in fields(self)
                   if f.name != INSTITUTION and getattr(self, f.name) is not None}
        site = {} if self.institution is None else {INSTITUTION: self.institution}
        return RecordDict({**({ARRAYS: arrays} if arrays is not None else {}),
                           METRICS: MetricRecord(metrics), SITE: ConfigRecord(site)})

    @classmethod
    def claim_ok(cls, name: str, value) -> bool:
        """Whether `value` is a valid claim for the field `name`."""
        return problem(next(f for f in fields(cls) if f.name == name).metadata["kind"], value) is None

    @classmethod
    def _read(cls, content: RecordDict, names) -> dict:
        """The fields `names` of `content`, checked; ReplyError naming the key of a malformed one."""
        metrics = content.metric_records.get(METRICS)
        if metrics is None:
            raise ReplyError(METRICS, "must be a MetricRecord, got missing")
        site = content.config_records.get(SITE)
        values = {}
        for f in (f for f in fields(cls) if f.name in names):
            kind = f.metadata["kind"]
            if f.name == INSTITUTION:
                key, raw = f"{SITE}.{INSTITUTION}", site.get(INSTITUTION) if site is not None else None
            else:
                key, raw = wire_key(f.name), metrics.get(wire_key(f.name))
            if f.name in cls.CLAIMS:  # judged by the coordinator: an invalid claim reads as None
                values[f.name] = raw if raw is None or cls.claim_ok(f.name, raw) else None
            elif raw is not None or f.default is MISSING:
                why = problem(kind, raw)
                if why:
                    raise ReplyError(key, why)
                values[f.name] = int(raw) if kind in ("records", "count", "release") else raw
        if cls.NEEDS_ARRAYS and ARRAYS not in content.array_records:
            raise ReplyError(ARRAYS, "must be an ArrayRecord, got missing")
        return values

    @classmethod
    def parse(cls, content: RecordDict):
        """The reply `content` holds; ReplyError naming the key if it is malformed."""
        return cls(**cls._read(content, {f.name for f in fields(cls)}))

    @classmethod
    def from_message(cls, message: Message):
        """`parse` of a (non-error) reply message."""
        return cls.parse(message.content)


@dataclass(frozen=True)
class TrainReply(_Reply):
    """A DP-LoRA round: the update travels in `arrays`. `steps` counts over the whole job (a
    resumed job's too); the losses are NaN under DP (computed on private records without noise:
    not released); `epsilon`/`epsilon_rdp` are cumulative over the scope's history, DP only."""

    CLAIMS: ClassVar[tuple[str, ...]] = ("noise_multiplier", "sample_rate", "steps", "delta")
    NEEDS_ARRAYS: ClassVar[bool] = True
    num_examples: float = _f("weight")
    institution: str | None = _f("label", None)
    noise_multiplier: float | None = _f("sigma", None)
    sample_rate: float | None = _f("rate", None)
    steps: int | None = _f("steps", None)
    delta: float | None = _f("delta", None)
    bytes_up: int = _f("count", 0)
    train_loss_first: float = _f("number", math.nan)
    train_loss_last: float = _f("number", math.nan)
    epsilon: float | None = _f("number", None)
    epsilon_rdp: float | None = _f("number", None)


@dataclass(frozen=True)
class FisherReply(_Reply):
    """A DP Fisher pass: the diagonal travels in `arrays`; the release (σ, q, steps of one pass,
    δ) and the cumulative ε only under DP."""

    CLAIMS: ClassVar[tuple[str, ...]] = ("fisher_noise_multiplier", "fisher_sample_rate", "fisher_steps", "delta")
    NEEDS_ARRAYS: ClassVar[bool] = True
    num_examples: float = _f("weight")
    institution: str | None = _f("label", None)
    bytes_up: int = _f("count", 0)
    fisher_noise_multiplier: float | None = _f("sigma", None)
    fisher_sample_rate: float | None = _f("rate", None)
    fisher_steps: int | None = _f("steps", None)
    delta: float | None = _f("delta", None)
    epsilon: float | None = _f("number", None)
    epsilon_rdp: float | None = _f("number", None)


@dataclass(frozen=True)
class ValidationReply(_Reply):
    """Correct/total on the site's validation records. Noised counts carry their release
    (`noise_multiplier` over `correct`'s sensitivity 1, `sample_rate`, `steps`, `delta`): all of
    it must be valid or the reply is refused; exact counts carry none. Non-finite counts are not
    refused, only unusable (`counts` is None): the release is still charged."""

    correct: float = _f("number", math.nan)
    total: float = _f("number", math.nan)
    institution: str | None = _f("label", None)
    noise_multiplier: float | None = _f("noise", None)
    sample_rate: float | None = _f("number", None)  # claimed only: charged at 1
    steps: int | None = _f("release", None)
    delta: float | None = _f("delta", None)

    @classmethod
    def parse(cls, content: RecordDict) -> ValidationReply:
        metrics = content.metric_records.get(METRICS)
        noised = metrics is not None and wire_key("noise_multiplier") in metrics
        values = cls._read(content, {f.name for f in fields(cls)
                                     if noised or f.name in ("correct", "total", INSTITUTION)})
        if noised and "delta" not in values:
            raise ReplyError(wire_key("delta"), problem("delta", None))
        return cls(**values, **({"steps": 1} if noised and "steps" not in values else {}))

    @property
    def counts(self) -> tuple[float, float] | None:
        """(correct, total) as floats, or None if either is not finite."""
        counts = (float(self.correct), float(self.total))
        return counts if all(math.isfinite(c) for c in counts) else None


@dataclass(frozen=True)
class CensusReply(_Reply):
    """Who the node is and how many training records it holds for the job (counts only)."""

    num_examples: int = _f("records")
    institution: str = _f("name")


def reported(content: RecordDict) -> dict[str, float]:
    """Every number in the reply's `metrics`, by field name, as floats: the coordinator's log view,
    kept even when the reply is refused, so the privacy it claims is still charged."""
    metrics = content.metric_records.get(METRICS)
    return {field_name(k): float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}


def claimed_institution(content: RecordDict):
    """The name the reply gives itself (any value, or None): only compared with the bound one."""
    site = content.config_records.get(SITE)
    return site.get(INSTITUTION) if site is not None else None
