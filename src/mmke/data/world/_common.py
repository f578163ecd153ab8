"""Seeded randomness that depends only on (seed, keys), so each part of the world is reproducible alone."""

from __future__ import annotations

import zlib

import numpy as np


def rng_for(seed: int, *keys: str | int) -> np.random.Generator:
    """A generator keyed by the world seed and a path of names (stable across runs and platforms).

    Keying by name instead of drawing from one shared stream means adding an image or a case
    never shifts the random numbers of every other part of the world.
    """
    words = [seed, *(zlib.crc32(str(k).encode("utf-8")) for k in keys)]
    return np.random.default_rng(np.random.SeedSequence(words))


def pick(rng: np.random.Generator, items: tuple | list) -> object:
    """One element of ``items``, uniformly."""
    return items[int(rng.integers(len(items)))]


def permuted(rng: np.random.Generator, items: tuple | list) -> list:
    """A shuffled copy of ``items``."""
    return [items[i] for i in rng.permutation(len(items))]
