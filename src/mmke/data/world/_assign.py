"""Counterfactual targets by optimal assignment: each edited subject gets a distinct same-type target.

Scores favour targets sharing most relation types with the subject (VLKEB picks plausible
same-type replacements), so portability questions exist for both; the matching is the
construction pipeline's ``assign`` (``mmke.data.kg.counterfactual``).
"""

from __future__ import annotations

from collections.abc import Callable

from mmke.data.kg.counterfactual import assign, shared_relations
from mmke.data.world._common import rng_for
from mmke.data.world._plan import World


def entity_score(world: World) -> Callable[[str, str], float]:
    """10 x shared relation types + number of canonical paths whose answers differ (a tie-breaker)."""
    kg = world.kg
    shared = shared_relations({e.id: frozenset(kg.relations_of(e.id)) for e in kg.entities})
    answers = {e.id: [kg.walk(e.id, p) for p in world.paths.get(e.type, ())] for e in kg.entities}

    def score(e: str, new: str) -> float:
        differ = sum(1 for a, b in zip(answers[e], answers[new], strict=True) if b is not None and a != b)
        return shared(e, new) + differ

    return score


def entity_targets(world: World, slots: list[tuple[str, int]], split: str) -> list[str]:
    """A same-type counterfactual per (subject, round) slot: never itself, its look-alike or a repeat."""
    kg, score = world.kg, entity_score(world)
    used: dict[str, set[str]] = {}
    out: dict[tuple[str, int], str] = {}
    for rnd in sorted({r for _, r in slots}):
        for kind in sorted({kg.entity(s).type for s, r in slots if r == rnd}):
            rows = [s for s, r in slots if r == rnd and kg.entity(s).type == kind]
            cols = [e.id for e in kg.of_type(kind)]
            bad = _forbid(world, used)
            for s, t in zip(
                rows, assign(rows, cols, score, bad, rng_for(world.seed, "cf", split, kind, rnd)), strict=True
            ):
                out[(s, rnd)] = t
                used.setdefault(s, set()).add(t)
    return [out[slot] for slot in slots]


def sign_targets(world: World, slots: list[tuple[str, int]], split: str) -> list[str]:
    """A counterfactual meaning per (sign, round) slot: another sign's meaning, preferably of another kind."""
    kg = world.kg
    kind_of = {e.id: kg.walk(e.id, ("means", "rule_kind")) for e in kg.of_type("sign")}

    def score(s: str, other: str) -> float:
        return 10.0 if kind_of[s] != kind_of[other] else 0.0

    used: dict[str, set[str]] = {}
    out: dict[tuple[str, int], str] = {}
    cols = [e.id for e in kg.of_type("sign")]
    for rnd in sorted({r for _, r in slots}):
        rows = [s for s, r in slots if r == rnd]
        for s, t in zip(
            rows,
            assign(rows, cols, score, _forbid(world, used), rng_for(world.seed, "cf-sign", split, rnd)),
            strict=True,
        ):
            out[(s, rnd)] = kg.obj(t, "means") or ""
            used.setdefault(s, set()).add(t)
    return [out[slot] for slot in slots]


def _forbid(world: World, used: dict[str, set[str]]) -> Callable[[str, str], bool]:
    def bad(s: str, t: str) -> bool:
        return t == s or t == world.kg.similar.get(s) or t in used.get(s, set())

    return bad
