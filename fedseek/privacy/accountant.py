"""Privacy accounting over a whole history of DP-SGD releases (pure math: no Flower/MLflow/SQL).

A history is a list of `(noise_multiplier, sample_rate, steps)` entries, one per round (or Fisher
pass). epsilon is always computed from the *entire* history, so it composes across rounds, jobs and
restarts. PRV (Gopi et al. 2021) is the headline; RDP is reported alongside as a looser bound.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from functools import lru_cache

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedseek.privacy.noise_cache import cached_noise, remember_noise

History = list[tuple[float, float, int]]


def default_delta(num_records: int) -> float:
    """delta = min(1e-5, 0.01/N): N*delta <= 0.01 at every N, the project convention (DESIGN.md
    section 2; the chance that some record's guarantee fails stays below 1 %)."""
    return min(1e-5, 0.01 / max(num_records, 1))


def _merge(history: Iterable[tuple[float, float, int]]) -> History:
    """Merge consecutive entries with equal (sigma, q) so PRV composes them in one go."""
    merged: History = []
    for sigma, q, steps in history:
        if steps <= 0:
            continue
        if merged and merged[-1][0] == sigma and merged[-1][1] == q:
            merged[-1] = (sigma, q, merged[-1][2] + int(steps))
        else:
            merged.append((float(sigma), float(q), int(steps)))
    return merged


def epsilon(history: Iterable[tuple[float, float, int]], delta: float, method: str = "prv") -> float:
    """epsilon at `delta` after every release in `history` (0.0 for an empty history)."""
    if method not in ("prv", "rdp"):
        raise ValueError(f"unknown accountant {method!r}; use 'prv' or 'rdp'")
    return _epsilon(tuple(_merge(history)), float(delta), method)


@lru_cache(maxsize=256)  # institutions with equal (sigma, q, steps, delta) share one computation
def _epsilon(entries: tuple[tuple[float, float, int], ...], delta: float, method: str) -> float:
    if not entries:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in entries):
        return math.inf
    accountant = RDPAccountant() if method == "rdp" else PRVAccountant()
    accountant.history = list(entries)
    if method == "rdp":
        return float(accountant.get_epsilon(delta))
    return float(accountant.get_epsilon(delta, eps_error=0.001))


@lru_cache(maxsize=64)
def _fresh_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    spends = lambda sigma: epsilon([(sigma, sample_rate, steps)], delta)  # noqa: E731
    sigma = cached_noise(target_epsilon, delta, sample_rate, steps, spends)
    if sigma is None:
        sigma = float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                           sample_rate=sample_rate, steps=steps, accountant="prv",
                                           epsilon_tolerance=0.005))
        remember_noise(target_epsilon, delta, sample_rate, steps, sigma)
    return sigma


def noise_for_budget(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                     spent: Iterable[tuple[float, float, int]] = ()) -> float:
    """Smallest noise multiplier such that `spent` followed by `steps` steps at `sample_rate`
    stays within `target_epsilon` (PRV). Raises ValueError if the budget is already gone."""
    spent = tuple((float(s), float(q), int(n)) for s, q, n in spent)
    return _noise_after(float(target_epsilon), float(delta), float(sample_rate), int(steps), spent)


@lru_cache(maxsize=64)
def _noise_after(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                 spent: tuple[tuple[float, float, int], ...]) -> float:
    if not spent:
        return _fresh_noise(target_epsilon, delta, sample_rate, steps)
    spent_list = list(spent)
    if epsilon(spent_list, delta) >= target_epsilon:
        raise ValueError(f"privacy budget epsilon={target_epsilon} is already spent "
                         f"({epsilon(spent_list, delta):.3f} at delta={delta:g})")
    fits = lambda sigma: epsilon(spent_list + [(sigma, sample_rate, steps)], delta) <= target_epsilon  # noqa: E731
    # more spent budget means more noise: the fresh sigma is a lower bound; widen the upper one
    low = high = _fresh_noise(target_epsilon, delta, sample_rate, steps)
    while not fits(high):
        low, high = high, high * 1.1
        if high > 1e4:
            raise ValueError("no noise multiplier fits the remaining budget")
    while high - low > 1e-3 * high:  # bisection: epsilon decreases monotonically in sigma
        mid = (low + high) / 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high
