"""Composition rule of an institution's privacy ledger (pure math: no Flower/MLflow/SQL).

A ledger entry is one release: `(data_scope, sigma, q, steps)`. `data_scope` names the disjoint
slice of the institution's records that the mechanism touched: `"all"` (every record) or a
continual-learning period such as `"2005-2009"`. Periods are disjoint record sets, so releases on
different periods compose in parallel while `"all"` releases touch every record:

    epsilon(institution) = max over scopes s of epsilon(entries of s  +  entries of "all")

With only `"all"` entries this is plain sequential composition of the whole history.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fedseek.privacy.accountant import epsilon

ALL_RECORDS = "all"


@dataclass(frozen=True)
class Release:
    """One DP release charged to an institution (a training round or a Fisher pass)."""

    scope: str
    sigma: float
    q: float
    steps: int


def histories_by_scope(releases: Iterable[Release]) -> dict[str, list[tuple[float, float, int]]]:
    """The (sigma, q, steps) history each record of a scope has been exposed to, in ledger order:
    a scope's own releases interleaved with every `"all"` release."""
    releases = list(releases)
    scopes = {r.scope for r in releases if r.scope != ALL_RECORDS} or {ALL_RECORDS}
    return {scope: [(r.sigma, r.q, r.steps) for r in releases if r.scope in (scope, ALL_RECORDS)]
            for scope in sorted(scopes)}


def institution_epsilon(releases: Iterable[Release], delta: float, method: str = "prv") -> float:
    """epsilon of the institution after `releases` at `delta` (0.0 for none): the worst scope."""
    histories = histories_by_scope(releases)
    return max((epsilon(history, delta, method) for history in histories.values()), default=0.0)


def projected_epsilon(spent: Iterable[Release], planned: Iterable[Release], delta: float,
                      method: str = "prv") -> float:
    """epsilon the institution would have after the stored releases plus a planned job's."""
    return institution_epsilon(list(spent) + list(planned), delta, method)
