"""Noise multipliers found by the (seconds-long) PRV search, remembered across processes.

Every process of a job (the CLI's pre-flight, the coordinator's plan, each site) searches the same
sigma for the same (epsilon, delta, q, steps). The first one stores it in a small JSON file under
`$XDG_CACHE_HOME/fedseek` (default ~/.cache/fedseek; `FEDSEEK_NOISE_CACHE` names another file, "off"
disables it); later ones reuse it only after checking it: a cached sigma is taken only if the
accountant confirms that it spends at most the target (one epsilon evaluation instead of a search),
so a stale or tampered file can cost utility (a larger sigma), never privacy.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def cache_file() -> Path | None:
    named = os.environ.get("FEDSEEK_NOISE_CACHE", "")
    if named.lower() == "off":
        return None
    if named:
        return Path(named).expanduser()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "fedseek" / "noise_multipliers.json"


def _key(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> str:
    return f"{target_epsilon!r}|{delta!r}|{sample_rate!r}|{int(steps)}"


def _read(path: Path) -> dict:
    try:
        entries = json.loads(path.read_text())
        return entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        return {}


def cached_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, spends) -> float | None:
    """The remembered sigma if `spends(sigma)` (its epsilon) is within the target, else None."""
    path = cache_file()
    if path is None:
        return None
    sigma = _read(path).get(_key(target_epsilon, delta, sample_rate, steps))
    if not isinstance(sigma, (int, float)) or not 0 < sigma < 1e6:
        return None
    return float(sigma) if spends(float(sigma)) <= target_epsilon else None


def remember_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, sigma: float) -> None:
    """Add one entry (atomic replace; a failure to write only loses the shortcut)."""
    path = cache_file()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read(path)
        entries[_key(target_epsilon, delta, sample_rate, steps)] = float(sigma)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(handle, "w") as out:
            json.dump(entries, out)
        os.replace(temporary, path)
    except OSError:
        pass
