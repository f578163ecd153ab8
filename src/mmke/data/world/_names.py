"""Invented names built from syllables: a closed vocabulary of plain lowercase words, unique per entity."""

from __future__ import annotations

import numpy as np

from mmke.errors import ConfigError

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "st")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o")
_CODAS = ("", "", "", "n", "r", "l", "k", "s", "m")


class NamePool:
    """Draws invented words that were never drawn before and are not reserved (template words)."""

    def __init__(self, rng: np.random.Generator, reserved: set[str]) -> None:
        self._rng = rng
        self._used = set(reserved)

    def word(self, syllables: int, suffix: str = "") -> str:
        """A fresh word of ``syllables`` syllables plus ``suffix``; retries until it is new."""
        for _ in range(10_000):
            w = "".join(self._syllable() for _ in range(syllables)) + suffix
            if w not in self._used and len(w) >= 4:
                self._used.add(w)
                return w
        raise ConfigError("invented-name space exhausted; lower the entity counts")

    def claim(self, word: str) -> bool:
        """Mark a fixed word as used; False when it already was."""
        if word in self._used:
            return False
        self._used.add(word)
        return True

    def _syllable(self) -> str:
        r = self._rng
        return (
            _ONSETS[int(r.integers(len(_ONSETS)))]
            + _VOWELS[int(r.integers(len(_VOWELS)))]
            + (_CODAS[int(r.integers(len(_CODAS)))])
        )
