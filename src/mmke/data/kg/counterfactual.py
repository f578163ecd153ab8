"""Counterfactual targets: the most similar other option (MedMKEB) or a same-type entity by matching (VLKEB).

Multiple-choice items take the other option whose text embedding is closest to the answer's
(all-MiniLM-L6-v2 by default), as MedMKEB does. Entity edits take a distinct same-type target per
subject by maximum-weight bipartite matching (``scipy.optimize.linear_sum_assignment``) on the
number of relation types the two share, so portability questions exist for both old and new.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mmke.embeddings import TextEmbedder, embedder_name, unit_rows
from mmke.errors import ConfigError

_FORBIDDEN = 1e9


def assign(
    rows: Sequence[str],
    cols: Sequence[str],
    score: Callable[[str, str], float],
    forbidden: Callable[[str, str], bool],
    rng: np.random.Generator,
) -> list[str]:
    """One distinct column per row maximising the total score; forbidden pairs are never chosen.

    A tiny seeded jitter breaks ties, so different seeds give different (equally good) targets.
    """
    from scipy.optimize import linear_sum_assignment  # imported here: the CLI lists steps without it

    if not rows:
        return []
    cost = np.empty((len(rows), len(cols)))
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            cost[i, j] = _FORBIDDEN if forbidden(r, c) else -score(r, c)
    cost -= rng.random(cost.shape) * 1e-3
    ri, ci = linear_sum_assignment(cost)
    out = [""] * len(rows)
    for i, j in zip(ri, ci, strict=True):
        if cost[i, j] >= _FORBIDDEN / 2:
            raise ConfigError(f"no allowed counterfactual target for {rows[i]}; raise the entity counts")
        out[int(i)] = cols[int(j)]
    return out


def shared_relations(relations_of: Mapping[str, frozenset[str]]) -> Callable[[str, str], float]:
    """Score of a (subject, target) pair: 10 x the relation types both have (VLKEB's pairing rule)."""

    def score(subject: str, target: str) -> float:
        return 10.0 * len(relations_of.get(subject, frozenset()) & relations_of.get(target, frozenset()))

    return score


def match_entities(
    subjects: Sequence[str],
    type_of: Mapping[str, str],
    relations_of: Mapping[str, frozenset[str]],
    rng: np.random.Generator,
    forbidden: Callable[[str, str], bool] | None = None,
) -> dict[str, str]:
    """A distinct same-type counterfactual per subject, maximising shared relation types overall.

    Candidates are every entity of ``type_of`` with the subject's type, never the subject itself.
    """
    score = shared_relations(relations_of)
    bad = forbidden or (lambda s, t: False)
    out: dict[str, str] = {}
    for kind in sorted({type_of[s] for s in subjects}):
        rows = [s for s in subjects if type_of[s] == kind]
        cols = sorted(e for e, t in type_of.items() if t == kind)
        chosen = assign(rows, cols, score, lambda s, t: s == t or bad(s, t), rng)
        out.update(zip(rows, chosen, strict=True))
    return out


@dataclass(frozen=True)
class Nearest:
    """Unit embeddings of option texts (D,) and the embedder's name; picks the closest option."""

    vectors: Mapping[str, np.ndarray]
    name: str

    def most_similar(self, answer: str, others: Sequence[str]) -> str:
        """The option of ``others`` with the highest cosine to ``answer`` (ties: the earlier one)."""
        sims = [float(self.vectors[o] @ self.vectors[answer]) for o in others]
        return others[int(np.argmax(sims))]


def embed_texts(texts: Sequence[str], embedder: TextEmbedder) -> Nearest:
    """Embed the distinct ``texts`` in one call (none: the embedder is never called or loaded)."""
    unique = list(dict.fromkeys(texts))
    if not unique:
        return Nearest({}, embedder_name(embedder))
    vectors = np.asarray(embedder(unique))  # (N, D)
    if vectors.ndim != 2 or vectors.shape[0] != len(unique):
        raise ValueError(f"embedder returned shape {vectors.shape} for {len(unique)} texts")
    return Nearest(dict(zip(unique, unit_rows(vectors), strict=True)), embedder_name(embedder))
