"""Where DP noise and Poisson sampling draw their randomness (pure: numpy, torch, the OS).

DP-SGD is only private if the party that sees the released update cannot regenerate the noise
added to it. By default both the sampler and the noise generator are seeded from the operating
system's CSPRNG (`secrets`, i.e. os.urandom) inside the node's process: nothing in the job's
config, the institution's name or the round number determines them, and the seed is never
stored or sent. A fixed seed exists only for tests and benchmarks (`reproducible=True`), and a
job that uses it is NOT private (report.json, the ledger and MLflow say so; tracked and deployed
jobs refuse it).
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class NoiseSource:
    """The sampler and the noise generator of one DP release (a round, a Fisher pass, a count)."""

    sampler: np.random.Generator  # Poisson sampling of records
    noise: torch.Generator  # Gaussian noise (passed to Opacus' DPOptimizer as its `generator`)
    private: bool  # False: regenerable from `seed` (tests and benchmarks only)


def noise_label(dp: bool, reproducible: bool) -> str:
    """How a job's DP noise was drawn, as report.json, MLflow and the ledger listing show it."""
    if not dp:
        return "none (no DP)"
    return "reproducible (NOT PRIVATE: seeded from the job config)" if reproducible else "private (node CSPRNG)"


def noise_source(reproducible_seed: int | tuple[int, ...] | None = None,
                 device: str | torch.device = "cpu") -> NoiseSource:
    """A fresh, secretly seeded source; with `reproducible_seed`, a deterministic one (not private)."""
    private = reproducible_seed is None
    noise = torch.Generator(device=device)
    if private:
        sampler = np.random.default_rng(secrets.randbits(128))
        noise.manual_seed(secrets.randbits(63))
    else:  # the sampler's stream is that of default_rng(seed); the noise seed does not draw from it
        sequence = np.random.SeedSequence(reproducible_seed)
        sampler = np.random.default_rng(sequence)
        noise.manual_seed(int(sequence.generate_state(1, np.uint64)[0] >> 1))
    return NoiseSource(sampler, noise, private)
