"""The world's knowledge graph: typed entities with invented names, functional relations, multi-hop paths.

Relations are functional (one object per subject and relation), so a path of relations from an
entity has exactly one answer and portability targets are a walk over the triples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmke.data.kg.multihop import relation_paths
from mmke.data.world._vocab import FILM_ADJECTIVES, FILM_NOUNS

#: Types whose entities have a drawn identity and can be the subject of a visual-entity edit.
ENTITY_EDIT_TYPES = ("person", "film", "organisation", "animal", "landmark")
VISUAL_TYPES = (*ENTITY_EDIT_TYPES, "sign")
MAX_HOPS = 4


@dataclass(frozen=True)
class Relation:
    """A relation type: subject type -> object type, and how often a subject has it."""

    name: str
    domain: str
    range: str
    prob: float = 1.0


RELATIONS = (
    Relation("born_in", "person", "city"),
    Relation("citizen_of", "person", "country", 0.6),
    Relation("works_for", "person", "organisation", 0.5),
    Relation("occupation", "person", "profession", 0.7),
    Relation("speaks", "person", "language", 0.4),
    Relation("directed_by", "film", "person"),
    Relation("genre", "film", "genre", 0.8),
    Relation("filmed_in", "film", "city", 0.5),
    Relation("headquartered_in", "organisation", "city"),
    Relation("founded_by", "organisation", "person", 0.5),
    Relation("native_to", "animal", "country"),
    Relation("eats", "animal", "food", 0.7),
    Relation("stands_in", "landmark", "city"),
    Relation("built_by", "landmark", "organisation", 0.4),
    Relation("located_in", "city", "country"),
    Relation("capital", "country", "city"),
    Relation("official_language", "country", "language"),
    Relation("written_in", "language", "script"),
    Relation("means", "sign", "meaning"),
    Relation("rule_kind", "meaning", "rule_kind"),
    Relation("treated_with", "finding", "treatment"),
    Relation("managed_by", "treatment", "specialist"),
    Relation("works_in", "specialist", "department"),
)
RELATION_BY_NAME = {r.name: r for r in RELATIONS}


@dataclass(frozen=True)
class Entity:
    id: str
    type: str
    name: str


@dataclass(frozen=True)
class Triple:
    subject: str
    relation: str
    object: str


@dataclass(frozen=True, eq=False)
class KnowledgeGraph:
    """Entities, triples, visual specs and the most-similar-entity map, with lookups."""

    entities: tuple[Entity, ...]
    triples: tuple[Triple, ...]
    visual: dict[str, dict[str, int]] = field(default_factory=dict)
    similar: dict[str, str] = field(default_factory=dict)
    _by_id: dict[str, Entity] = field(init=False, repr=False)
    _out: dict[tuple[str, str], str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {e.id: e for e in self.entities})
        object.__setattr__(self, "_out", {(t.subject, t.relation): t.object for t in self.triples})

    def entity(self, eid: str) -> Entity:
        return self._by_id[eid]

    def name(self, eid: str) -> str:
        return self._by_id[eid].name

    def of_type(self, kind: str) -> tuple[Entity, ...]:
        return tuple(e for e in self.entities if e.type == kind)

    def obj(self, subject: str, relation: str) -> str | None:
        return self._out.get((subject, relation))

    def relations_of(self, subject: str) -> tuple[str, ...]:
        """Relation names ``subject`` has, in schema order."""
        return tuple(r.name for r in RELATIONS if (subject, r.name) in self._out)

    def walk(self, start: str, path: tuple[str, ...]) -> str | None:
        """The entity reached from ``start`` along ``path``, or None where a relation is missing."""
        node: str | None = start
        for rel in path:
            node = self._out.get((node, rel)) if node is not None else None
        return node

    def to_json(self) -> dict[str, Any]:
        ents = [
            {
                "id": e.id,
                "type": e.type,
                "name": e.name,
                **({"visual": self.visual[e.id]} if e.id in self.visual else {}),
            }
            for e in self.entities
        ]
        return {
            "entities": ents,
            "triples": [[t.subject, t.relation, t.object] for t in self.triples],
            "similar": dict(sorted(self.similar.items())),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KnowledgeGraph:
        ents = tuple(Entity(e["id"], e["type"], e["name"]) for e in data["entities"])
        visual = {e["id"]: dict(e["visual"]) for e in data["entities"] if "visual" in e}
        triples = tuple(Triple(*t) for t in data["triples"])
        return cls(ents, triples, visual, dict(data["similar"]))


def schema_paths(kind: str, max_hops: int = MAX_HOPS) -> list[tuple[str, ...]]:
    """Every relation path from type ``kind`` of up to ``max_hops`` hops that visits no type twice.

    Ordered by length, then required relations before optional ones, then schema order.
    """

    def steps(type_: str) -> list[tuple[str, str]]:
        return [(r.name, r.range) for r in RELATIONS if r.domain == type_]

    out = relation_paths(kind, steps, max_hops)
    order = {r.name: i for i, r in enumerate(RELATIONS)}
    return sorted(out, key=lambda p: (len(p), -_prob(p), [order[r] for r in p]))


def _prob(path: tuple[str, ...]) -> float:
    out = 1.0
    for rel in path:
        out *= RELATION_BY_NAME[rel].prob
    return out


def canonical_paths(kind: str, per_hop: int) -> tuple[tuple[str, ...], ...]:
    """The paths asked about type ``kind`` (corpus, checks, portability): ``per_hop`` per length."""
    paths = schema_paths(kind)
    return tuple(p for n in range(1, MAX_HOPS + 1) for p in [q for q in paths if len(q) == n][:per_hop])


# ---------------------------------------------------------------- entities


def film_titles(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` distinct two-word titles from the fixed adjective x noun lists."""
    combos = [f"{a} {b}" for a in FILM_ADJECTIVES for b in FILM_NOUNS]
    return [combos[int(i)] for i in rng.choice(len(combos), size=n, replace=False)]
