"""Privacy accounting: cross-checked against Google's dp_accounting, composed over whole histories."""
from __future__ import annotations

import dp_accounting
import pytest

from fedseek.privacy.accountant import default_delta, epsilon, noise_for_budget


def reference(sigma: float, q: float, steps: int, delta: float, kind: str) -> float:
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    accountant = (dp_accounting.pld.PLDAccountant() if kind == "pld"
                  else dp_accounting.rdp.RdpAccountant())
    accountant.compose(event, steps)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("sigma, q, steps", [(0.94, 0.1, 100), (1.2, 0.125, 60), (2.0, 0.01, 1000)])
def test_epsilon_matches_dp_accounting_within_one_percent(sigma, q, steps):
    delta = 1e-5
    assert epsilon([(sigma, q, steps)], delta) == pytest.approx(reference(sigma, q, steps, delta, "pld"), rel=0.01)
    assert epsilon([(sigma, q, steps)], delta, "rdp") == pytest.approx(
        reference(sigma, q, steps, delta, "rdp"), rel=0.01)


def test_epsilon_composes_over_rounds_and_grows_monotonically():
    per_round = (1.0, 0.125, 12)
    values = [epsilon([per_round] * rounds, 1e-5) for rounds in range(1, 6)]
    assert all(b > a for a, b in zip(values, values[1:]))
    # the whole history equals one accountant run over all steps, not the per-round value
    assert values[-1] == pytest.approx(epsilon([(1.0, 0.125, 60)], 1e-5), rel=1e-6)
    assert values[-1] > 1.5 * values[0]


def test_noise_for_budget_spends_exactly_the_target():
    sigma = noise_for_budget(8.0, 1e-5, 0.125, 60)
    assert epsilon([(sigma, 0.125, 60)], 1e-5) == pytest.approx(8.0, rel=0.01)
    assert epsilon([(sigma, 0.125, 60)], 1e-5) <= 8.0 + 1e-6
    spent = [(sigma, 0.125, 30)]
    more = noise_for_budget(8.0, 1e-5, 0.125, 60, spent=spent)
    assert epsilon(spent + [(more, 0.125, 60)], 1e-5) <= 8.0 + 1e-3
    assert more > sigma  # less budget left, more noise needed
    with pytest.raises(ValueError, match="already spent"):
        noise_for_budget(1.0, 1e-5, 0.125, 10, spent=[(0.5, 0.5, 100)])


def test_default_delta_keeps_n_delta_at_most_one_percent_at_every_n():
    # the old min(1e-5, N^-1.1) gave N*delta = 0.35 at N = 35,000: a 35 % chance of a failed record
    for n in (1, 10, 999, 1000, 2334, 35_000, 10**5, 10**6, 10**9):
        assert n * default_delta(n) <= 0.01 + 1e-15, n
    assert default_delta(35_000) == pytest.approx(0.01 / 35_000)
    assert default_delta(1000) == 1e-5 and default_delta(0) == 1e-5  # the cap for small sites
    assert default_delta(10**6) == pytest.approx(1e-8)
    assert epsilon([], 1e-5) == 0.0
