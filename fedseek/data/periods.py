"""Data periods for continual learning: an ordered list of slices of a task's records.

- `years` (PubMedQA): by publication year, ≤2004 / 2005–2009 / 2010–2013 / 2014+ (domain-incremental:
  every period has all labels). Records without a YEAR (58 in PubMedQA) belong to no period and are
  left out, with a logged count.
- `intent-groups` (banking77) / `condition-groups` (medical_abstracts): task-incremental; the label
  ids are cut into contiguous groups, each period trains and is scored with the head masked to its
  own labels.
- `column` (user data, `--period-column`): one period per distinct value of that column, ordered
  by value (ISO dates `2024-03-31`, quarters `2024Q1` and years sort correctly); `--period-freq
  year|quarter` first maps ISO dates to years or quarters.

Label drift between time periods (new or vanished labels, a moved label distribution) is logged
per period and the data used as is (`loader.label_drift`).

Institutions keep the same records across periods: the whole pool is partitioned once, then each
institution's share is sliced by period.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np

from fedseek.data.loader import DataError, LabelledTexts, label_drift
from fedseek.data.partition import stratified_split

logger = logging.getLogger("fedseek")
YEAR_BINS = ((None, 2004), (2005, 2009), (2010, 2013), (2014, None))
SCHEMES = ("years", "intent-groups", "condition-groups", "column")
_warned: set[tuple[str, int]] = set()
DEFAULT_SCHEME = {"pubmedqa": "years", "banking77": "intent-groups", "medical_abstracts": "condition-groups",
                  "pubmedqa-gen": "years", "banking77-gen": "intent-groups"}


@dataclass
class Period:
    name: str
    labels: list[int] | None  # active label ids (task-incremental), None = all labels

    def selects(self, rows: LabelledTexts, scheme: str, freq: str = "") -> np.ndarray:
        """Indices of `rows` in this period."""
        if self.labels is not None:
            return np.flatnonzero(np.isin(rows.labels, self.labels))
        keys = [_period_key(p, scheme, freq) for p in (rows.periods or [""] * len(rows))]
        return np.array([i for i, k in enumerate(keys) if k == self.name], dtype=int)


def _year_bin(year: str) -> str:
    if not year.strip():
        return ""
    value = int(year[:4])
    for low, high in YEAR_BINS:
        if (low is None or value >= low) and (high is None or value <= high):
            return f"<={high}" if low is None else f"{low}+" if high is None else f"{low}-{high}"
    return ""


def _period_key(value: str, scheme: str, freq: str) -> str:
    if scheme == "years":
        return _year_bin(value)
    match = re.match(r"^(\d{4})-(\d{2})", value)
    if freq and not match:
        raise DataError(f"period value {value!r} is not an ISO date (YYYY-MM-DD) for --period-freq {freq}")
    if freq == "year":
        return match.group(1)
    if freq == "quarter":
        return f"{match.group(1)}Q{(int(match.group(2)) - 1) // 3 + 1}"
    return value


def _label_groups(num_labels: int, groups: int) -> list[list[int]]:
    if not 1 <= groups <= num_labels:
        raise DataError(f"cannot cut {num_labels} labels into {groups} period groups")
    return [list(map(int, g)) for g in np.array_split(np.arange(num_labels), groups)]


def plan_periods(scheme: str, pool: LabelledTexts, groups: int = 3, freq: str = "") -> list[Period]:
    """The ordered periods of `pool` under `scheme`."""
    if scheme not in SCHEMES:
        raise DataError(f"period scheme {scheme!r} is not one of {SCHEMES}")
    if scheme in ("intent-groups", "condition-groups"):
        return [Period(f"labels {g[0]}-{g[-1]}", g) for g in _label_groups(len(pool.label_names), groups)]
    if pool.periods is None:
        raise DataError(f"{pool.source}: scheme {scheme!r} needs a period per row (--period-column)")
    keys = sorted({_period_key(p, scheme, freq) for p in pool.periods} - {""},
                  key=lambda k: (not k.startswith("<="), k))  # "<=2004" first
    missing = sum(1 for p in pool.periods if not _period_key(p, scheme, freq))
    if missing and (pool.source, missing) not in _warned:
        _warned.add((pool.source, missing))
        logger.warning("%s: %d records have no period value and are left out", pool.source, missing)
    if len(keys) < 2:
        raise DataError(f"{pool.source}: continual learning needs at least 2 periods, found {keys}")
    label_drift(pool.labels, [_period_key(p, scheme, freq) for p in pool.periods], pool.label_names,
                pool.source, order=keys)  # policy: used as is, drift logged per period
    return [Period(k, None) for k in keys]


def split_validation(rows: LabelledTexts, fraction: float, seed: int) -> tuple[LabelledTexts, LabelledTexts]:
    """(train, validation): each institution holds out a stratified validation split of its own
    records for choosing λ without touching the test set."""
    if fraction <= 0 or len(rows) < 4:
        return rows, rows.subset([])
    keep, held = stratified_split(rows.labels, fraction, seed)
    return rows.subset(keep), rows.subset(held)
