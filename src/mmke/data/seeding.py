"""Seeded randomness that depends only on (seed, keys), so each part of a build is reproducible alone."""

from __future__ import annotations

import zlib

import numpy as np


def rng_for(seed: int, *keys: str | int) -> np.random.Generator:
    """A generator keyed by the build seed and a path of names (stable across runs and platforms).

    Keying by name instead of drawing from one shared stream means adding an image or a case
    never shifts the random numbers of every other part of the build.
    """
    words = [seed, *(zlib.crc32(str(k).encode("utf-8")) for k in keys)]
    return np.random.default_rng(np.random.SeedSequence(words))
