"""The four edit types as EditCases: visual entity, visual semantic, user-specific and medical MCQ.

The medical cases carry MultiMedEdit's task types: the scan MCQ is "understanding"; the eval split
adds "reasoning" cases on the same scans, whose answer needs the (edited) finding plus one step of
the world's medical knowledge (finding -> treatment). Every probe whose target is an entity name
carries that entity's aliases.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from numpy.random import Generator

import mmke.data.world._templates as T
from mmke.data.kg.adversarial import AttackParts
from mmke.data.mcq import render_options
from mmke.data.world._aliases import alias_table
from mmke.data.world._assign import entity_targets, sign_targets
from mmke.data.world._common import pick, rng_for
from mmke.data.world._medical import FINDINGS, Combo, mcq_options
from mmke.data.world._plan import World, entity_image, scan_image, train_slots, user_image
from mmke.data.world._probes import portability, robustness, text_locality
from mmke.types import LOCALITY_KINDS, EditCase, EditFact, EditType, ImageRef, Probe, ProbeKind

K = ProbeKind
_PREFIX = {
    EditType.VISUAL_ENTITY: "ve",
    EditType.VISUAL_SEMANTIC: "vs",
    EditType.USER_SPECIFIC: "us",
    EditType.MEDICAL_MCQ: "med",
}
UNDERSTANDING, REASONING = "understanding", "reasoning"
#: The finding -> treatment step a reasoning case asks about (the world model is taught this wording).
REASONING_PATH = ("treated_with",)


def build_cases(world: World, split: str) -> list[EditCase]:
    """Every case of ``split`` ("eval" or "train"), grouped by edit type, with stable ids."""
    subjects = world.eval_subjects if split == "eval" else world.train_subjects
    c = world.config
    counts = {
        EditType.VISUAL_ENTITY: c.train_visual_entity,
        EditType.VISUAL_SEMANTIC: c.train_visual_semantic,
        EditType.USER_SPECIFIC: c.train_user_specific,
        EditType.MEDICAL_MCQ: c.train_medical,
    }
    out: list[EditCase] = []
    for et in EditType:
        slots = [(s, 0) for s in subjects[et]] if split == "eval" else train_slots(subjects[et], counts[et])
        ids = [f"world/{split}/{_PREFIX[et]}-{i:04d}" for i in range(len(slots))]
        out += _BUILDERS[et](world, split, ids, slots)
    if split == "eval":  # after every other case, so runs with a limit pick the same cases as before
        scans = subjects[EditType.MEDICAL_MCQ][: c.eval_medical_reasoning]
        out += [medical_reasoning_case(world, f"world/eval/medr-{i:04d}", s, 0) for i, s in enumerate(scans)]
    return with_aliases(out, alias_table(world.kg.entities))


def with_aliases(cases: list[EditCase], table: dict[str, tuple[str, ...]]) -> list[EditCase]:
    """Each probe whose target has aliases gets them (locality probes compare with the unedited
    model's answer, so theirs would never be read)."""

    def probe(p: Probe) -> Probe:
        aliases = table.get(p.target, ())
        return replace(p, aliases=aliases) if aliases and p.kind not in LOCALITY_KINDS else p

    return [replace(c, probes=tuple(probe(p) for p in c.probes)) for c in cases]


def _entity_cases(world: World, split: str, ids: list[str], slots: list[tuple[str, int]]) -> list[EditCase]:
    targets = entity_targets(world, slots, split)
    return [entity_case(world, cid, s, new, r) for cid, (s, r), new in zip(ids, slots, targets, strict=True)]


def entity_case(world: World, case_id: str, e: str, new: str, rnd: int) -> EditCase:
    """Image of ``e`` relabelled as the same-type entity ``new`` (VLKEB / MMKE-Bench visual entity edit)."""
    kg, rng = world.kg, rng_for(world.seed, "case", case_id)
    kind, sim = kg.entity(e).type, kg.similar[e]
    img = entity_image(e, world.train_views[rnd % len(world.train_views)])
    q, target = T.recognition(kind), kg.name(new)
    port, paths = portability(world, T.image_ref(kind), new, e, img)
    parts = AttackParts(
        old=kg.name(e),
        similar=kg.name(sim),
        vague=f"so which {T.TYPE_NOUN[kind]} is this , roughly ?",
        context=f"this picture was taken in {_city(world, rng)} last summer .",
    )
    probes = [
        Probe(K.RELIABILITY, q, target, img),
        Probe(K.TEXT_GENERALITY, T.recognition(kind, T.HELD_OUT), target, img),
        Probe(K.IMAGE_GENERALITY, q, target, entity_image(e, int(pick(rng, world.held_out_views)))),
        *text_locality(world, case_id),
        Probe(K.IMAGE_LOCALITY, q, kg.name(sim), entity_image(sim, int(pick(rng, world.held_out_views)))),
        *port,
        *robustness(world, q, img, target, parts),
    ]
    meta = {"old_entity": e, "new_entity": new, "similar_entity": sim, "portability_paths": ";".join(paths)}
    fact = EditFact(q, target, img, kg.name(e))
    return EditCase(case_id, EditType.VISUAL_ENTITY, fact, tuple(probes), e, meta)


def _sign_cases(world: World, split: str, ids: list[str], slots: list[tuple[str, int]]) -> list[EditCase]:
    meanings = sign_targets(world, slots, split)
    return [sign_case(world, cid, s, m, r) for cid, (s, r), m in zip(ids, slots, meanings, strict=True)]


def sign_case(world: World, case_id: str, sign: str, new: str, rnd: int) -> EditCase:
    """A sign's meaning (a rule) rewritten to another sign's meaning (MMKE-Bench visual semantic edit)."""
    kg, rng = world.kg, rng_for(world.seed, "case", case_id)
    ref, old, twin = T.image_ref("sign"), kg.obj(sign, "means") or "", kg.similar[sign]
    img = entity_image(sign, world.train_views[rnd % len(world.train_views)])
    q, target = T.ask("means", ref), kg.name(new)
    port, paths = portability(world, T.noun_phrase(("means",), ref), new, old, img)
    parts = AttackParts(
        old=kg.name(old),
        similar=kg.name(twin),
        vague="so what is this sign about , roughly ?",
        context=f"this sign stands at the gate of a school in {_city(world, rng)} .",
    )
    probes = [
        Probe(K.RELIABILITY, q, target, img),
        Probe(K.IMAGE_RELIABILITY, T.ask("means", ref, 1), target, img),
        Probe(K.TEXT_RELIABILITY, T.ask("means", kg.name(sign)), target),
        Probe(K.TEXT_GENERALITY, T.ask("means", ref, T.HELD_OUT), target, img),
        Probe(K.IMAGE_GENERALITY, q, target, entity_image(sign, int(pick(rng, world.held_out_views)))),
        *text_locality(world, case_id),
        Probe(
            K.IMAGE_LOCALITY,
            q,
            kg.name(kg.obj(twin, "means") or ""),
            entity_image(twin, int(pick(rng, world.held_out_views))),
        ),
        *port,
        *robustness(world, q, img, target, parts),
    ]
    meta = {
        "old_entity": old,
        "new_entity": new,
        "similar_entity": twin,
        "portability_paths": ";".join(paths),
    }
    fact = EditFact(q, target, img, kg.name(old))
    return EditCase(case_id, EditType.VISUAL_SEMANTIC, fact, tuple(probes), sign, meta)


def _user_cases(world: World, split: str, ids: list[str], slots: list[tuple[str, int]]) -> list[EditCase]:
    return [user_case(world, cid, s) for cid, (s, _) in zip(ids, slots, strict=True)]


def user_case(world: World, case_id: str, uid: str) -> EditCase:
    """Insert a personal fact: the pictured pet or item of an owner is called <new name> (no ground truth)."""
    u, rng = world.user(uid), rng_for(world.seed, "case", case_id)
    other = world.users[(world.users.index(u) + 1) % len(world.users)]
    img, q = user_image(uid, 0), T.USER_EDIT.format(p=u.phrase)
    loc_kind = "animal" if u.category == "animal" else "landmark"
    loc = str(pick(rng, [e.id for e in world.kg.of_type(loc_kind)]))
    host = "my friend" if other.owner == "me" else other.owner
    parts = AttackParts(
        old=other.name,
        similar=other.phrase,
        vague="so what do we call this one , roughly ?",
        context=f"this photo was taken at the house of {host} .",
    )
    probes = [
        Probe(K.RELIABILITY, q, u.name, img),
        Probe(K.TEXT_RELIABILITY, T.USER_TEXT.format(p=u.phrase), u.name),
        Probe(K.IMAGE_RELIABILITY, T.USER_IMAGE.format(k=u.kind), u.name, img),
        Probe(
            K.IMAGE_GENERALITY, q, u.name, user_image(uid, 1 + int(rng.integers(world.config.user_views - 1)))
        ),
        *text_locality(world, case_id),
        Probe(
            K.IMAGE_LOCALITY,
            T.recognition(loc_kind),
            world.kg.name(loc),
            entity_image(loc, int(pick(rng, world.held_out_views))),
        ),
        Probe(K.PORTABILITY, T.USER_PORTABILITY[u.category].format(n=u.name), u.kind, hop=1),
        *robustness(world, q, img, u.name, parts),
    ]
    meta = {"user_item": uid, "kind": u.kind, "owner": u.owner, "portability_paths": "kind"}
    return EditCase(case_id, EditType.USER_SPECIFIC, EditFact(q, u.name, img), tuple(probes), uid, meta)


def _medical_cases(world: World, split: str, ids: list[str], slots: list[tuple[str, int]]) -> list[EditCase]:
    return [medical_case(world, cid, s, r) for cid, (s, r) in zip(ids, slots, strict=True)]


def canonical_mcq(world: World, combo: Combo) -> tuple[tuple[str, ...], str]:
    """The fixed options and counterfactual answer of a scan item (cases use these)."""
    return mcq_options(combo.finding, FINDINGS[: world.config.findings], rng_for(world.seed, "mcq", combo.id))


def medical_case(world: World, case_id: str, combo_id: str, rnd: int) -> EditCase:
    """A scan's multiple-choice answer changed to the most similar option (MedMKEB counterfactual edit)."""
    c, rng = world.combo(combo_id), rng_for(world.seed, "case", case_id)
    options, cf = canonical_mcq(world, c)
    img, q = (
        scan_image(combo_id, world.train_scans[rnd % len(world.train_scans)]),
        render_options(T.mcq(c.phrase), options),
    )
    old, new = world.finding_id(c.finding.name), world.finding_id(cf)
    port, paths = portability(world, T.FINDING_REF, new, old, img)
    parts = _medical_attack_parts(world, c, cf, options, rng)
    asked = (q, render_options(T.mcq(c.phrase, T.HELD_OUT), options))
    probes = [
        *_scan_probes(
            world,
            case_id,
            combo_id,
            asked,
            cf,
            img,
            options,
            rng,
            lambda: _medical_image_locality(world, c, cf, rng),
        ),
        *port,
        *robustness(world, q, img, cf, parts, options),
    ]
    meta = {"combo": combo_id, "old_entity": old, "new_entity": new, "portability_paths": ";".join(paths)}
    fact = EditFact(q, cf, img, c.finding.name, options)
    return EditCase(case_id, EditType.MEDICAL_MCQ, fact, tuple(probes), combo_id, meta, task=UNDERSTANDING)


def medical_reasoning_case(world: World, case_id: str, combo_id: str, rnd: int) -> EditCase:
    """MultiMedEdit's reasoning task: the treatment a scan calls for, changed to the treatment of the
    counterfactual finding its understanding case writes (options: the four findings' treatments).

    Reliability, generality and locality only, as MultiMedEdit measures; the understanding case's
    portability already asks the treatment after the finding edit.
    """
    c, rng = world.combo(combo_id), rng_for(world.seed, "case", case_id)
    findings, cf = canonical_mcq(world, c)
    options = tuple(_treatment(f) for f in findings)
    img = scan_image(combo_id, world.train_scans[rnd % len(world.train_scans)])
    q = render_options(T.composed(REASONING_PATH, T.FINDING_REF), options)
    # the scan named by modality and body part instead of "the image": words the model knows
    rephrased = render_options(T.composed(REASONING_PATH, f"the finding in {c.phrase}"), options)
    target = _treatment(cf)
    probes = _scan_probes(
        world,
        case_id,
        combo_id,
        (q, rephrased),
        target,
        img,
        options,
        rng,
        lambda: _reasoning_image_locality(world, c, cf, rng),
    )
    old, new = world.finding_id(c.finding.name), world.finding_id(cf)
    meta = {
        "combo": combo_id,
        "old_entity": old,
        "new_entity": new,
        "reasoning_path": ";".join(REASONING_PATH),
    }
    fact = EditFact(q, target, img, _treatment(c.finding.name), options)
    return EditCase(case_id, EditType.MEDICAL_MCQ, fact, tuple(probes), combo_id, meta, task=REASONING)


def _treatment(finding: str) -> str:
    return next(f.treatment for f in FINDINGS if f.name == finding)


def _scan_probes(
    world: World,
    case_id: str,
    combo_id: str,
    questions: tuple[str, str],
    target: str,
    img: ImageRef,
    options: tuple[str, ...],
    rng: Generator,
    image_locality: Callable[[], Probe],
) -> list[Probe]:
    """A scan question's Rel, T-Gen (its rephrasing), I-Gen (a held-out scan of the same item),
    T-Loc and I-Loc; ``image_locality`` draws from ``rng`` after I-Gen does, in one fixed order."""
    q, rephrased = questions
    other = scan_image(combo_id, int(pick(rng, world.held_out_scans)))
    return [
        Probe(K.RELIABILITY, q, target, img, options=options),
        Probe(K.TEXT_GENERALITY, rephrased, target, img, options=options),
        Probe(K.IMAGE_GENERALITY, q, target, other, options=options),
        *text_locality(world, case_id),
        image_locality(),
    ]


def _medical_attack_parts(
    world: World, c: Combo, cf: str, options: tuple[str, ...], rng: Generator
) -> AttackParts:
    """Attack ingredients: the old answer, another option as the look-alike, a misleading history."""
    confuse = next(o for o in options if o not in (cf, c.finding.name))
    history = str(pick(rng, [f.name for f in FINDINGS[: world.config.findings] if f.name != cf]))
    return AttackParts(
        old=c.finding.name,
        similar=confuse,
        context=f"the patient was treated for {history} last year .",
        vague=render_options(f"so what is going on in {c.phrase} , roughly ?", options),
    )


def _medical_image_locality(world: World, c: Combo, cf: str, rng: Generator) -> Probe:
    """An MCQ about an unrelated scan (another body part, a finding that is neither old nor new)."""
    others = [o for o in world.combos if o.part != c.part and o.finding.name not in (c.finding.name, cf)]
    o = others[int(rng.integers(len(others)))]
    options, _ = canonical_mcq(world, o)
    return Probe(
        K.IMAGE_LOCALITY,
        render_options(T.mcq(o.phrase), options),
        o.finding.name,
        scan_image(o.id, int(pick(rng, world.train_scans))),
        options=options,
    )


def _reasoning_image_locality(world: World, c: Combo, cf: str, rng: Generator) -> Probe:
    """The reasoning question about an unrelated scan (as ``_medical_image_locality`` picks it)."""
    unrelated = _medical_image_locality(world, c, cf, rng)
    options = tuple(_treatment(f) for f in unrelated.options)
    q = render_options(T.composed(REASONING_PATH, T.FINDING_REF), options)
    return Probe(K.IMAGE_LOCALITY, q, _treatment(unrelated.target), unrelated.image, options=options)


def _city(world: World, rng: Generator) -> str:
    """A random city name (misleading context for attacks)."""
    return world.kg.name(str(pick(rng, [x.id for x in world.kg.of_type("city")])))


_BUILDERS = {
    EditType.VISUAL_ENTITY: _entity_cases,
    EditType.VISUAL_SEMANTIC: _sign_cases,
    EditType.USER_SPECIFIC: _user_cases,
    EditType.MEDICAL_MCQ: _medical_cases,
}
