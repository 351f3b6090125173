"""The cross-process memo of PRV noise searches (fedseek/privacy/noise_cache.py): a cached sigma is
used only after the accountant confirms it, so a tampered cache file cannot lower the noise."""
from __future__ import annotations

import json

import pytest

from fedseek.privacy import accountant
from fedseek.privacy.accountant import epsilon

ARGS = (3.0, 1e-5, 0.2, 6)  # target epsilon, delta, q, steps


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "noise.json"
    monkeypatch.setenv("FEDSEEK_NOISE_CACHE", str(path))
    accountant._fresh_noise.cache_clear()
    yield path
    accountant._fresh_noise.cache_clear()


def no_search(monkeypatch):
    def refuse(**_):
        raise AssertionError("searched although a valid sigma was cached")
    monkeypatch.setattr(accountant, "get_noise_multiplier", refuse)


def test_a_second_process_reuses_the_searched_sigma(cache, monkeypatch):
    sigma = accountant._fresh_noise(*ARGS)
    assert json.loads(cache.read_text()) == {"3.0|1e-05|0.2|6": sigma}
    accountant._fresh_noise.cache_clear()  # as a fresh process
    no_search(monkeypatch)
    assert accountant._fresh_noise(*ARGS) == sigma


def test_a_tampered_smaller_sigma_is_not_used(cache, monkeypatch):
    honest = accountant._fresh_noise(*ARGS)
    cache.write_text(json.dumps({"3.0|1e-05|0.2|6": honest / 3}))  # an attacker lowers the noise
    accountant._fresh_noise.cache_clear()
    sigma = accountant._fresh_noise(*ARGS)
    assert sigma == honest and epsilon([(sigma, 0.2, 6)], 1e-5) <= 3.0
    assert json.loads(cache.read_text())["3.0|1e-05|0.2|6"] == honest  # and the entry is repaired


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"3.0|1e-05|0.2|6": "x"}', '{"3.0|1e-05|0.2|6": -1}'])
def test_a_corrupt_cache_is_ignored(cache, content):
    cache.write_text(content)
    sigma = accountant._fresh_noise(*ARGS)
    assert epsilon([(sigma, 0.2, 6)], 1e-5) <= 3.0


def test_off_disables_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSEEK_NOISE_CACHE", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    accountant._fresh_noise.cache_clear()
    accountant._fresh_noise(*ARGS)
    accountant._fresh_noise.cache_clear()
    assert not list(tmp_path.rglob("*.json"))
