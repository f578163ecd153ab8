"""Seeded choices of the world; ``rng_for`` (keyed randomness) is shared with the build pipeline."""

from __future__ import annotations

import numpy as np

from mmke.data.seeding import rng_for

__all__ = ["permuted", "pick", "rng_for"]


def pick(rng: np.random.Generator, items: tuple | list) -> object:
    """One element of ``items``, uniformly."""
    return items[int(rng.integers(len(items)))]


def permuted(rng: np.random.Generator, items: tuple | list) -> list:
    """A shuffled copy of ``items``."""
    return [items[i] for i in rng.permutation(len(items))]
