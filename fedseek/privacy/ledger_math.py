"""Composition rule of an institution's privacy ledger (pure math: no Flower/MLflow/SQL).

A ledger entry is one release: `(scope, sigma, q, steps)`. `scope` is the key of a `DataScope`:
the dataset (a fingerprint of the records' source), the slicing scheme with its parameters and the
slice (a period's name, or "all"). Two releases touch provably disjoint records only when they are
different slices of ONE scheme over ONE dataset; every other pair (another dataset, other scheme
parameters, an "all" slice, a legacy key of an older DB) may share records and composes
sequentially:

    epsilon(institution) = max over scopes s of epsilon(every release not provably disjoint
                                                         from s, in ledger order)

This bounds every record: all releases touching a record x share x with one of them (r), so none
is provably disjoint from r's scope. `histories_by_scope` takes the maximum over the finer cells
(one slice per scheme), which keeps "all" releases from being charged with every period at once.
With only "all" entries it is plain sequential composition.
"""
from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import product
from urllib.parse import quote, unquote

from fedseek.privacy.accountant import epsilon

ALL_RECORDS = "all"
_KEY = re.compile(r"^ds=([^;]*);scheme=([^;]*);slice=([^;]*)$")
_LONGEST = 160  # a longer key component is replaced by its digest (DB column: 512 characters)
_MAX_CELLS = 4096


def _component(value: str) -> str:
    quoted = quote(value, safe=" <>=+-_.,:()@")  # ';' and '%' are always escaped
    return quoted if len(quoted) <= _LONGEST else "sha256:" + hashlib.sha256(value.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class DataScope:
    """The records a release touched. `dataset`/`scheme` are "" when unknown (a legacy key)."""

    dataset: str
    scheme: str
    slice: str = ALL_RECORDS

    def key(self) -> str:
        return f"ds={_component(self.dataset)};scheme={_component(self.scheme)};slice={_component(self.slice)}"

    @classmethod
    def parse(cls, key: str) -> "DataScope":
        """The scope of a stored key; a legacy key ("all", a bare period name) is a slice of an
        unknown dataset and scheme, so it composes sequentially with everything."""
        match = _KEY.match(key)
        if match is None:
            return cls("", "", key)
        dataset, scheme, part = (unquote(g) for g in match.groups())
        return cls(dataset, scheme, part)

    @property
    def known(self) -> bool:
        return bool(self.dataset) and bool(self.scheme)

    def disjoint(self, other: "DataScope") -> bool:
        """True only if the two scopes provably share no record."""
        return (self.known and other.known and self.dataset == other.dataset and self.scheme == other.scheme
                and ALL_RECORDS not in (self.slice, other.slice) and self.slice != other.slice)


@dataclass(frozen=True)
class Release:
    """One DP release charged to an institution (a training round, a Fisher pass, noised counts)."""

    scope: str
    sigma: float
    q: float
    steps: int


def counts_release(scope: str, sigma: float, counts: int = 1, steps: int = 1) -> Release:
    """`steps` Gaussian releases of `counts` record counts (each of sensitivity 1, std `sigma`), e.g.
    a site's noised validation count: one record moves each count by at most 1, so the L2
    sensitivity is sqrt(counts) and the noise multiplier sigma/sqrt(counts), at rate 1."""
    return Release(scope, float(sigma) / math.sqrt(max(int(counts), 1)), 1.0, max(int(steps), 1))


def histories_by_scope(releases: Iterable[Release]) -> dict[str, list[tuple[float, float, int]]]:
    """The (sigma, q, steps) histories, in ledger order, that bound every record's exposure.

    A record lies in at most one slice of each (dataset, scheme); a "cell" picks one present slice
    per (dataset, scheme) and holds every release that may touch such a record: those slices, the
    "all" releases and the releases of unknown scope. Every record's releases are within some cell,
    so the worst cell bounds the institution; it is never above the worst scope's history of every
    release not provably disjoint from it (the fallback when cells would be too many). Keys: the
    cell's slice keys joined by "|" ("all" when no release names a slice)."""
    releases = list(releases)
    parsed = [DataScope.parse(r.scope) for r in releases]
    groups: dict[tuple[str, str], set[str]] = {}
    for scope in parsed:
        if scope.known and scope.slice != ALL_RECORDS:
            groups.setdefault((scope.dataset, scope.scheme), set()).add(scope.slice)
    history = lambda keep: [(r.sigma, r.q, r.steps) for r, p in zip(releases, parsed) if keep(p)]  # noqa: E731
    if math.prod(len(v) for v in groups.values()) > _MAX_CELLS:
        return {r.scope: history(lambda p, s=s: not s.disjoint(p)) for r, s in zip(releases, parsed)}
    names = sorted(groups)
    cells = {}
    for chosen in product(*(sorted(groups[n]) for n in names)):
        pick = dict(zip(names, chosen))
        label = "|".join(DataScope(d, m, pick[(d, m)]).key() for d, m in names) or ALL_RECORDS
        cells[label] = history(lambda p, pick=pick: pick.get((p.dataset, p.scheme), p.slice) == p.slice
                               or not p.known or p.slice == ALL_RECORDS)
    return cells


def institution_epsilon(releases: Iterable[Release], delta: float, method: str = "prv") -> float:
    """epsilon of the institution after `releases` at `delta` (0.0 for none): the worst scope."""
    histories = histories_by_scope(releases)
    return max((epsilon(history, delta, method) for history in histories.values()), default=0.0)


def projected_epsilon(spent: Iterable[Release], planned: Iterable[Release], delta: float,
                      method: str = "prv") -> float:
    """epsilon the institution would have after the stored releases plus a planned job's."""
    return institution_epsilon(list(spent) + list(planned), delta, method)
