"""Generating the knowledge graph from a seed: names, geography, sparse optional relations, visual specs."""

from __future__ import annotations

import numpy as np

import mmke.data.world._templates as T
from mmke.data.world._common import rng_for
from mmke.data.world._config import WorldConfig
from mmke.data.world._kg import (
    RELATIONS,
    VISUAL_TYPES,
    Entity,
    KnowledgeGraph,
    Triple,
    film_titles,
)
from mmke.data.world._medical import FINDINGS, SPECIALIST_DEPARTMENT, TREATMENT_SPECIALIST
from mmke.data.world._names import NamePool
from mmke.data.world._users import KINDS, OWNERS
from mmke.data.world._visual import ENTITY_FAMILY, SIGN_FAMILY, make_specs, similar_map
from mmke.data.world._vocab import (
    FOODS,
    GENRES,
    LANDMARK_SUFFIXES,
    ORG_SUFFIXES,
    PROFESSIONS,
    SIGN_MEANINGS,
    sign_meanings,
)

# Relations whose objects are not drawn uniformly at random (structure the generator must keep).
_STRUCTURED = {
    "located_in",
    "capital",
    "official_language",
    "written_in",
    "citizen_of",
    "means",
    "rule_kind",
    "treated_with",
    "managed_by",
    "works_in",
}


def reserved_words() -> set[str]:
    """Every plain word the templates and fixed lists use, so invented names never collide with them."""
    texts: list[str] = [*T.RECOGNITION, *T.MCQ, T.USER_EDIT, T.USER_TEXT, T.USER_IMAGE]
    texts += [t for r in T.RELATION_TEXT.values() for t in r] + [p for p, a in T.locality_facts()]
    texts += [a for _, a in T.locality_facts()] + list(T.NUMBERS) + list(OWNERS) + list(KINDS)
    texts += [*PROFESSIONS, *GENRES, *FOODS, *ORG_SUFFIXES, *LANDMARK_SUFFIXES, *SIGN_MEANINGS]
    texts += [m for ms in SIGN_MEANINGS.values() for m in ms] + [f.name for f in FINDINGS]
    texts += list(TREATMENT_SPECIALIST) + list(SPECIALIST_DEPARTMENT) + list(SPECIALIST_DEPARTMENT.values())
    return {w for t in texts for w in t.replace("{", " ").replace("}", " ").split()}


def generate_kg(config: WorldConfig, seed: int) -> tuple[KnowledgeGraph, NamePool]:
    """The whole KG for ``seed``; also returns the name pool so later names stay unique."""
    pool = NamePool(rng_for(seed, "names"), reserved_words())
    names = _names(config, rng_for(seed, "names", "lists"), pool)
    entities = tuple(
        Entity(f"{kind}-{i:04d}", kind, n) for kind, ns in names.items() for i, n in enumerate(ns)
    )
    ids: dict[str, list[str]] = {kind: [] for kind in names}
    for e in entities:
        ids[e.type].append(e.id)
    triples = _triples(ids, names, rng_for(seed, "kg", "triples"))
    visual: dict[str, dict[str, int]] = {}
    similar: dict[str, str] = {}
    for kind in VISUAL_TYPES:
        family = SIGN_FAMILY if kind == "sign" else ENTITY_FAMILY
        specs, pairs = make_specs(ids[kind], family, rng_for(seed, "visual", kind))
        visual.update(specs)
        similar.update(similar_map(ids[kind], specs, pairs))
    return KnowledgeGraph(entities, tuple(triples), visual, similar), pool


def _names(c: WorldConfig, rng: np.random.Generator, pool: NamePool) -> dict[str, list[str]]:
    firsts = [pool.word(2) for _ in range(max(8, c.people // 4))]
    meanings = sign_meanings(c.signs)
    findings = FINDINGS[: c.findings]
    specialists = sorted({TREATMENT_SPECIALIST[f.treatment] for f in findings})

    def suffixed(n: int, suffixes: tuple[str, ...]) -> list[str]:
        return [f"{pool.word(2)} {suffixes[int(rng.integers(len(suffixes)))]}" for _ in range(n)]

    return {
        "person": [
            f"{firsts[int(rng.integers(len(firsts)))]} {pool.word(int(rng.integers(2, 4)))}"
            for _ in range(c.people)
        ],
        "film": film_titles(c.films, rng),
        "organisation": suffixed(c.organisations, ORG_SUFFIXES),
        "animal": [pool.word(2) for _ in range(c.animals)],
        "landmark": suffixed(c.landmarks, LANDMARK_SUFFIXES),
        "city": [pool.word(3) for _ in range(c.cities)],
        "country": [pool.word(2, "ia") for _ in range(c.countries)],
        "language": [pool.word(2, "ish") for _ in range(c.languages)],
        "script": [pool.word(2, "ic") for _ in range(c.scripts)],
        "profession": list(PROFESSIONS),
        "genre": list(GENRES),
        "food": list(FOODS),
        "sign": [f"{pool.word(2)} sign" for _ in range(c.signs)],
        "meaning": [m for m, _ in meanings],
        "rule_kind": list(dict.fromkeys(k for _, k in meanings)),
        "finding": [f.name for f in findings],
        "treatment": [f.treatment for f in findings],
        "specialist": specialists,
        "department": list(dict.fromkeys(SPECIALIST_DEPARTMENT[s] for s in specialists)),
    }


def _triples(
    ids: dict[str, list[str]], names: dict[str, list[str]], rng: np.random.Generator
) -> list[Triple]:
    """Structured relations first (geography, signs, medicine), then sparse random ones."""
    out = _geography(ids, rng) + _signs(ids, names, rng) + _medicine(ids, names)
    for rel in RELATIONS:
        if rel.name in _STRUCTURED:
            if rel.name == "citizen_of":
                out += _citizenship(ids, rng, rel.prob, out)
            continue
        for subject in ids[rel.domain]:
            if rng.random() < rel.prob:
                objs = ids[rel.range]
                out.append(Triple(subject, rel.name, objs[int(rng.integers(len(objs)))]))
    order = {r.name: i for i, r in enumerate(RELATIONS)}
    return sorted(out, key=lambda t: (t.subject.split("-")[0], t.subject, order[t.relation]))


def _geography(ids: dict[str, list[str]], rng: np.random.Generator) -> list[Triple]:
    countries, cities, langs, scripts = ids["country"], ids["city"], ids["language"], ids["script"]
    out: list[Triple] = []
    for i, city in enumerate(cities):  # the first city of each country is its capital
        country = countries[i] if i < len(countries) else countries[int(rng.integers(len(countries)))]
        out.append(Triple(city, "located_in", country))
    out += [Triple(country, "capital", cities[i]) for i, country in enumerate(countries)]
    for i, country in enumerate(countries):
        lang = langs[i] if i < len(langs) else langs[int(rng.integers(len(langs)))]
        out.append(Triple(country, "official_language", lang))
    for i, lang in enumerate(langs):
        script = scripts[i] if i < len(scripts) else scripts[int(rng.integers(len(scripts)))]
        out.append(Triple(lang, "written_in", script))
    return out


def _citizenship(
    ids: dict[str, list[str]], rng: np.random.Generator, prob: float, done: list[Triple]
) -> list[Triple]:
    """Half of the citizens hold the passport of their birth country, the rest a random one."""
    city_country = {t.subject: t.object for t in done if t.relation == "located_in"}
    born = {t.subject: t.object for t in done if t.relation == "born_in"}
    out = []
    for person in ids["person"]:
        if rng.random() < prob:
            home = city_country.get(born.get(person, ""))
            pick = (
                home
                if home and rng.random() < 0.5
                else ids["country"][int(rng.integers(len(ids["country"])))]
            )
            out.append(Triple(person, "citizen_of", pick))
    return out


def _signs(ids: dict[str, list[str]], names: dict[str, list[str]], rng: np.random.Generator) -> list[Triple]:
    meaning_ids = ids["meaning"]
    perm = rng.permutation(len(meaning_ids))
    out = [Triple(sign, "means", meaning_ids[int(perm[i])]) for i, sign in enumerate(ids["sign"])]
    kind_id = dict(zip(names["rule_kind"], ids["rule_kind"], strict=True))
    kinds = dict(sign_meanings(len(meaning_ids)))
    out += [
        Triple(m, "rule_kind", kind_id[kinds[name]])
        for m, name in zip(meaning_ids, names["meaning"], strict=True)
    ]
    return out


def _medicine(ids: dict[str, list[str]], names: dict[str, list[str]]) -> list[Triple]:
    by_name = {
        n: i
        for kind in ("treatment", "specialist", "department")
        for n, i in zip(names[kind], ids[kind], strict=True)
    }
    out = []
    for fid, fname in zip(ids["finding"], names["finding"], strict=True):
        f = next(x for x in FINDINGS if x.name == fname)
        out.append(Triple(fid, "treated_with", by_name[f.treatment]))
    for tid, tname in zip(ids["treatment"], names["treatment"], strict=True):
        out.append(Triple(tid, "managed_by", by_name[TREATMENT_SPECIALIST[tname]]))
    for sid, sname in zip(ids["specialist"], names["specialist"], strict=True):
        out.append(Triple(sid, "works_in", by_name[SPECIALIST_DEPARTMENT[sname]]))
    return out
