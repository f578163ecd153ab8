"""Visual identities as small attribute vectors, drawn in look-alike pairs that differ in one attribute.

Every visual entity of a type gets a spec (a dict of small integers) that the renderer turns into
pixels. Specs come in twins: the second of a pair copies the first except for one attribute,
so each entity has a designated most-similar other entity (VLKEB's hard image locality).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mmke.errors import ConfigError

#: Index -> RGB: red, orange, yellow, green, teal, blue, purple, pink, brown, white, black.
#: The first eight are "main" colours; white and black only decorate.
PALETTE = (
    (220, 40, 40),
    (245, 140, 30),
    (240, 210, 40),
    (50, 160, 60),
    (30, 170, 170),
    (40, 80, 220),
    (140, 60, 190),
    (240, 120, 180),
    (130, 80, 40),
    (245, 245, 245),
    (25, 25, 25),
)
BACKGROUNDS = ((200, 220, 240), (225, 235, 200), (240, 225, 200), (220, 215, 235))

#: attribute -> number of values, for KG entities (person, film, organisation, animal, landmark).
ENTITY_ATTRS = {
    "variant": 4,
    "main": 8,
    "pattern": 5,
    "pattern_colour": 11,
    "accent_shape": 6,
    "accent_colour": 11,
    "background": 4,
}
#: attributes a twin may differ in (the background is jittered per view, so it is a weak cue).
ENTITY_TWIN_ATTRS = ("variant", "main", "pattern", "pattern_colour", "accent_shape", "accent_colour")

SIGN_BORDERS = (0, 5, 10, 3)  # red, blue, black, green
SIGN_FILLS = (9, 2, 5, 1)  # white, yellow, blue, orange
SIGN_SYMBOL_COLOURS = (10, 9, 0)  # black, white, red
SIGN_ATTRS = {"outer": 5, "border": 4, "fill": 4, "symbol": 10, "symbol_colour": 3, "post": 3, "plate": 3}
SIGN_TWIN_ATTRS = ("outer", "border", "fill", "symbol", "symbol_colour", "post", "plate")

Spec = dict[str, int]


@dataclass(frozen=True)
class SpecFamily:
    """How to draw random specs of one family and which ones are legible."""

    attrs: dict[str, int]
    twin_attrs: tuple[str, ...]
    legible: Callable[[Spec], bool]


def _entity_legible(s: Spec) -> bool:
    # The pattern and the accent must contrast with what they are drawn on, or the attribute vanishes.
    return s["pattern_colour"] != s["main"] and s["accent_colour"] not in (s["main"], s["pattern_colour"])


def _sign_legible(s: Spec) -> bool:
    fill = SIGN_FILLS[s["fill"]]
    return SIGN_BORDERS[s["border"]] != fill and SIGN_SYMBOL_COLOURS[s["symbol_colour"]] != fill


ENTITY_FAMILY = SpecFamily(ENTITY_ATTRS, ENTITY_TWIN_ATTRS, _entity_legible)
SIGN_FAMILY = SpecFamily(SIGN_ATTRS, SIGN_TWIN_ATTRS, _sign_legible)


def hamming(a: Spec, b: Spec) -> int:
    return sum(a[k] != b[k] for k in a)


def make_specs(
    ids: list[str], family: SpecFamily, rng: np.random.Generator
) -> tuple[dict[str, Spec], list[tuple[str, str, str]]]:
    """Specs for ``ids`` (in order) as twin pairs; returns specs and (a, b, differing attribute) pairs.

    Bases keep Hamming distance >= 3 from every earlier spec and twins >= 2 from all but their
    base, so each twin pair is the unique nearest neighbour of its members.
    """
    specs: dict[str, Spec] = {}
    pairs: list[tuple[str, str, str]] = []
    for i in range(0, len(ids), 2):
        base = _draw(rng, family, list(specs.values()), min_dist=3)
        specs[ids[i]] = base
        if i + 1 < len(ids):
            others = list(specs.values())[:-1]
            twin, attr = _twin(rng, family, base, others)
            specs[ids[i + 1]] = twin
            pairs.append((ids[i], ids[i + 1], attr))
    return specs, pairs


def _draw(rng: np.random.Generator, family: SpecFamily, taken: list[Spec], min_dist: int) -> Spec:
    for _ in range(100_000):
        spec = {k: int(rng.integers(n)) for k, n in family.attrs.items()}
        if family.legible(spec) and all(hamming(spec, t) >= min_dist for t in taken):
            return spec
    raise ConfigError("visual attribute space exhausted; lower the entity counts of a type")


def _twin(rng: np.random.Generator, family: SpecFamily, base: Spec, others: list[Spec]) -> tuple[Spec, str]:
    for _ in range(100_000):
        attr = family.twin_attrs[int(rng.integers(len(family.twin_attrs)))]
        value = int(rng.integers(family.attrs[attr]))
        twin = {**base, attr: value}
        if value != base[attr] and family.legible(twin) and all(hamming(twin, o) >= 2 for o in others):
            return twin, attr
    raise ConfigError("visual attribute space exhausted; lower the entity counts of a type")


def similar_map(ids: list[str], specs: dict[str, Spec], pairs: list[tuple[str, str, str]]) -> dict[str, str]:
    """Each id -> its most similar other id: the twin, or (unpaired) the nearest spec, ties by order."""
    out: dict[str, str] = {}
    for a, b, _ in pairs:
        out[a], out[b] = b, a
    for e in ids:
        if e not in out and len(ids) > 1:
            out[e] = min(
                (x for x in ids if x != e), key=lambda x: (hamming(specs[e], specs[x]), ids.index(x))
            )
    return out
