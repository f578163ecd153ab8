"""Other names of the world's entities, as Wikidata's alternative labels give real ones.

An invented name's structure gives its short forms (a person's family name, an organisation,
landmark or sign without its type word, a country's republic); the medical words have their
clinical synonyms. The world model is never taught them: they are what a generated answer may
say instead of the target (free generation and the judge count them, MMQAKE-style), so alias
matching runs on the embedded default. Nothing here draws random numbers, so the rest of the
world stays byte-identical.
"""

from __future__ import annotations

from collections.abc import Iterable

from mmke.data.world._kg import Entity
from mmke.data.world._vocab import LANDMARK_SUFFIXES, ORG_SUFFIXES

#: Clinical synonyms of the medical slice's findings and treatments.
MEDICAL_SYNONYMS = {
    "mass": ("lump",),
    "fracture": ("break", "broken bone"),
    "cyst": ("fluid sac",),
    "nodules": ("nodule",),
    "effusion": ("fluid collection",),
    "abscess": ("pus collection",),
    "tumor": ("tumour", "neoplasm"),
    "stone": ("calculus",),
    "edema": ("oedema", "swelling"),
    "calcification": ("calcium deposit",),
    "infarct": ("infarction",),
    "hemorrhage": ("haemorrhage", "bleed"),
    "surgery": ("operation",),
    "cast": ("plaster cast",),
    "chemotherapy": ("chemo",),
    "lithotripsy": ("shock wave lithotripsy",),
    "diuretics": ("water pills",),
    "transfusion": ("blood transfusion",),
    "thrombolysis": ("clot busting",),
}


def entity_aliases(e: Entity) -> tuple[str, ...]:
    """The other names of ``e`` (none for names without a short form)."""
    words = e.name.split()
    if e.type == "person" and len(words) == 2:
        return (words[1],)
    if len(words) == 2 and words[1] in (*ORG_SUFFIXES, *LANDMARK_SUFFIXES, "sign"):
        return (words[0],)
    if e.type == "country":
        return (f"republic of {e.name}",)
    return MEDICAL_SYNONYMS.get(e.name, ())


def alias_table(entities: Iterable[Entity]) -> dict[str, tuple[str, ...]]:
    """Name -> aliases, leaving out any alias that is another entity's name (it would be ambiguous)."""
    ents = list(entities)
    names = {e.name for e in ents}
    table = {e.name: tuple(a for a in entity_aliases(e) if a not in names) for e in ents}
    return {name: aliases for name, aliases in table.items() if aliases}
