"""Seeds derived from integers, and seeding the global generators: the one seed mixer.

Every random stream of marscale (masks per (seed, step, micro, rank), the loader per
(seed, epoch, rank, worker, stream), dropout per rank) is seeded from a tuple of
integers through `derive_seed` or `seed_words`, so two streams never share a seed by
accident and a tuple always gives the same stream.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_words(*parts: int) -> list[int]:
    """The integers as a numpy SeedSequence entropy list (`np.random.default_rng(words)`)."""
    return [int(p) for p in parts]


def seed_word(*parts: int) -> int:
    """A 64-bit unsigned seed from integers, well mixed by SeedSequence (for Python's
    `random.Random`, which takes any integer)."""
    return int(np.random.SeedSequence(seed_words(*parts)).generate_state(1, np.uint64)[0])


def derive_seed(*parts: int) -> int:
    """`seed_word` shifted to 63 bits, accepted wherever a seed is a signed 64-bit integer
    (torch generators)."""
    return seed_word(*parts) >> 1


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
