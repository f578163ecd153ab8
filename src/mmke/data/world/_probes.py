"""Probe builders shared by the four edit types: text locality, portability chains, robustness attacks."""

from __future__ import annotations

import mmke.data.world._templates as T
from mmke.data.kg.adversarial import AttackParts, attacks
from mmke.data.kg.multihop import hop_questions, portability_paths
from mmke.data.world._common import rng_for
from mmke.data.world._plan import World
from mmke.types import EditFact, ImageRef, Probe, ProbeKind


def text_locality(world: World, key: str) -> list[Probe]:
    """Unrelated text-only facts (target = the true answer), drawn per case without repeats."""
    facts = T.locality_facts()
    rng = rng_for(world.seed, "tloc", key)
    picks = rng.choice(len(facts), size=world.config.text_locality_per_case, replace=False)
    return [Probe(ProbeKind.TEXT_LOCALITY, facts[int(i)][0], facts[int(i)][1]) for i in picks]


def portability(
    world: World, base: str, new: str, old: str, image: ImageRef | None
) -> tuple[list[Probe], list[str]]:
    """Multi-hop questions about the NEW entity ``new`` (answers walk the KG from it), hops 1..4.

    ``base`` is the phrase for the edited thing ("the person in the image"); questions nest
    relation phrases around it and never name an intermediate entity. Per hop, paths whose
    answer differs from the old entity's come first (they are the informative ones). Returns
    the probes and their paths ("born_in>located_in") in the same order.
    """
    kg = world.kg
    chosen = portability_paths(
        kg, world.paths.get(kg.entity(new).type, ()), new, old, world.config.portability_per_hop
    )
    probes = [
        Probe(
            ProbeKind.PORTABILITY,
            question,
            answer,
            image,
            hop=len(p),
            onehop_edit=_onehop(world, new, p[0]) if len(p) == 1 else None,
        )
        for p, question, answer in hop_questions(kg, chosen, new, base, T.PHRASE)
    ]
    return probes, [">".join(p) for p in chosen]


def _onehop(world: World, new: str, rel: str) -> EditFact:
    """The new entity's one-hop fact asked by name (VLKEB's edit-one-hop protocol writes it too)."""
    answer = world.kg.name(world.kg.obj(new, rel) or "")
    return EditFact(T.ask(rel, world.kg.name(new)), answer, ground_truth=answer)


def robustness(
    world: World,
    question: str,
    image: ImageRef | None,
    target: str,
    parts: AttackParts,
    options: tuple[str, ...] = (),
) -> list[Probe]:
    """All five attack types around the edit question; the expected answer stays the edit target."""
    detail = int(rng_for(world.seed, "detail", question, target).integers(1000))
    return [
        Probe(
            ProbeKind.ROBUSTNESS,
            prompt,
            target,
            image,
            attack=kind,
            options=options,
        )
        for kind, prompt in attacks(question, parts, detail)
    ]
