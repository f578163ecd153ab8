"""Multi-hop portability questions: relation paths from the new answer, asked without naming the hops.

VLKEB builds 1-4-hop portability from knowledge-graph chains that start at the edit's new
entity; MedMKEB does the same over a medical KG. A question nests one noun phrase per relation
around a reference to the edited thing ("what is the capital of the country of the person in
the image ?"), so it never names an intermediate entity, and its answer is a walk in the graph.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mmke.errors import BadRecordError

MAX_HOPS = 4


class Graph(Protocol):
    """What question building needs of a knowledge graph: walks and display names."""

    def walk(self, start: str, path: tuple[str, ...]) -> str | None: ...

    def name(self, eid: str) -> str: ...


def noun_phrase(path: Sequence[str], base: str, phrase: Mapping[str, str]) -> str:
    """Nest relation noun phrases: (born_in, located_in) -> "the country of the birthplace of <base>"."""
    out = base
    for rel in path:
        out = phrase[rel].format(x=out)
    return out


def composed(path: Sequence[str], base: str, phrase: Mapping[str, str]) -> str:
    """A multi-hop question that never names the intermediate entities."""
    return f"what is {noun_phrase(path, base, phrase)} ?"


def portability_paths(
    graph: Graph, candidates: Iterable[tuple[str, ...]], new: str, old: str | None, per_hop: int
) -> list[tuple[str, ...]]:
    """Up to ``per_hop`` paths per length 1..4 that have an answer from ``new``.

    Paths whose answer differs from the old entity's come first (they are the informative
    ones: a model that ignored the edit answers them wrongly); the sort is stable, so the
    candidates' own order breaks ties.
    """
    out: list[tuple[str, ...]] = []
    cands = list(candidates)
    for hop in range(1, MAX_HOPS + 1):
        usable = [p for p in cands if len(p) == hop and graph.walk(new, p)]
        usable.sort(key=lambda p: old is not None and graph.walk(old, p) == graph.walk(new, p))
        out += usable[:per_hop]
    return out


@dataclass(frozen=True, eq=False)
class TripleGraph:
    """A knowledge graph read from (subject, relation, object) rows; names are the ids themselves.

    Relations may be many-valued; a walk through a subject with several objects for the next
    relation has no single answer and returns None, so every question built has one answer.
    """

    triples: tuple[tuple[str, str, str], ...]
    _out: dict[tuple[str, str], tuple[str, ...]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        out: dict[tuple[str, str], list[str]] = {}
        for s, r, o in self.triples:
            out.setdefault((s, r), []).append(o)
        object.__setattr__(self, "_out", {k: tuple(dict.fromkeys(v)) for k, v in out.items()})

    @classmethod
    def read_tsv(cls, path: Path) -> TripleGraph:
        """Rows ``subject<TAB>relation<TAB>object``; a header row ``subject relation object`` is skipped."""
        rows: list[tuple[str, str, str]] = []
        try:
            with open(path, encoding="utf-8", newline="") as f:
                for line_no, row in enumerate(csv.reader(f, delimiter="\t"), 1):
                    if not row or row[0].startswith("#"):
                        continue
                    if len(row) != 3 or not all(x.strip() for x in row):
                        raise BadRecordError(f"{path}:{line_no}: expected subject, relation, object: {row}")
                    if line_no == 1 and [x.strip() for x in row] == ["subject", "relation", "object"]:
                        continue
                    rows.append((row[0].strip(), row[1].strip(), row[2].strip()))
        except OSError as e:
            raise BadRecordError(f"{path}: cannot read the knowledge graph ({e.strerror})") from None
        return cls(tuple(rows))

    def name(self, eid: str) -> str:
        return eid

    def walk(self, start: str, path: tuple[str, ...]) -> str | None:
        node: str | None = start
        for rel in path:
            objs = self._out.get((node, rel), ()) if node is not None else ()
            node = objs[0] if len(objs) == 1 else None
        return node

    def relations(self) -> list[str]:
        """Relation names in first-seen order."""
        return list(dict.fromkeys(r for _, r, _ in self.triples))

    def paths_from(self, start: str, max_hops: int = MAX_HOPS) -> list[tuple[str, ...]]:
        """Relation paths with one answer from ``start`` that never revisit an entity, shortest first."""
        order = self.relations()

        def steps(node: str) -> list[tuple[str, str]]:
            return [(rel, end) for rel in order if (end := self.walk(node, (rel,))) is not None]

        return sorted(relation_paths(start, steps, max_hops), key=len)


def relation_paths(
    start: str, steps: Callable[[str], Iterable[tuple[str, str]]], max_hops: int = MAX_HOPS
) -> list[tuple[str, ...]]:
    """Every path of 1..``max_hops`` relations from ``start`` that never revisits a node (depth first).

    ``steps(node)`` gives (relation, next node) pairs: entities of a graph, or types of a schema.
    """
    out: list[tuple[str, ...]] = []

    def grow(path: tuple[str, ...], seen: tuple[str, ...]) -> None:
        if path:
            out.append(path)
        if len(path) == max_hops:
            return
        for rel, nxt in steps(seen[-1]):
            if nxt not in seen:
                grow((*path, rel), (*seen, nxt))

    grow((), (start,))
    return out


def hop_questions(
    graph: Graph,
    paths: Sequence[tuple[str, ...]],
    start: str,
    base: str,
    phrase: Mapping[str, str],
) -> list[tuple[tuple[str, ...], str, str]]:
    """(path, question, answer name) for each path; the answer is checked to be a walk from ``start``."""
    out = []
    for p in paths:
        end = graph.walk(start, p)
        if end is None:
            raise BadRecordError(f"path {'>'.join(p)} has no single answer from {start!r}")
        out.append((tuple(p), composed(p, base, phrase), graph.name(end)))
    return out
