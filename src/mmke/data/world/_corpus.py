"""The world model's training corpus and the pre-edit check sets, as Samples.

The corpus is the unedited model's knowledge: recognition on training views, every fact by
name, unrelated text facts, composed image questions, sign meanings and scan MCQs. Held-out
templates are used only with non-eval subjects, and no eval case's edit target is ever an
answer about that case's images.
"""

from __future__ import annotations

import mmke.data.world._templates as T
from mmke.data.mcq import render_options
from mmke.data.world._common import permuted, rng_for
from mmke.data.world._kg import ENTITY_EDIT_TYPES
from mmke.data.world._medical import FINDINGS, mcq_options
from mmke.data.world._plan import World, entity_image, scan_image
from mmke.types import EditCase, Sample

COMPOSED_VIEWS = 2  # training views per composed question


def build_corpus(world: World, eval_cases: list[EditCase]) -> list[Sample]:
    """The whole training corpus, shuffled with the world seed; refuses to teach an eval edit target."""
    samples = (
        recognition_samples(world)
        + fact_samples(world)
        + locality_samples()
        + composed_samples(world)
        + sign_samples(world)
        + medical_samples(world)
        + lexicon_samples(world)
    )
    _refuse_leaks(samples, eval_cases)
    return permuted(rng_for(world.seed, "corpus", "order"), samples)


def visual_entities(world: World) -> list[str]:
    return [e.id for kind in ENTITY_EDIT_TYPES for e in world.kg.of_type(kind)]


def recognition_samples(world: World) -> list[Sample]:
    """Image -> name on training views, two templates per view (held-out only for non-eval subjects)."""
    out = []
    for eid in visual_entities(world):
        kind, allowed = world.kg.entity(eid).type, world.templates_for(eid)
        for v in world.train_views:
            for k in range(2):
                t = allowed[(v + k) % len(allowed)]
                out.append(Sample(T.recognition(kind, t), world.kg.name(eid), entity_image(eid, v)))
    return out


def fact_samples(world: World) -> list[Sample]:
    """Every triple asked by the subject's name, each allowed template (counterfactual targets included)."""
    kg = world.kg
    return [
        Sample(T.ask(t.relation, kg.name(t.subject), k), kg.name(t.object))
        for t in kg.triples
        for k in world.templates_for(t.subject)
    ]


def lexicon_samples(world: World) -> list[Sample]:
    """Each user item's name as a bare word to repeat, with no fact about it (text only).

    A real LLM can already say "bruno" before an edit tells it whose pet that is; without this
    the invented names would be tokens the model never produced, and an insertion edit would have
    to create a word as well as a fact, which no method but fine-tuning the head can do.
    """
    return [Sample(T.LEXICON.format(w=u.name), u.name) for u in sorted(world.users, key=lambda u: u.id)]


def locality_samples() -> list[Sample]:
    return [Sample(p, a) for p, a in T.locality_facts()]


def composed_samples(world: World) -> list[Sample]:
    """Multi-hop questions about the pictured entity on training views ("the person in the image")."""
    kg, out = world.kg, []
    for i, eid in enumerate(visual_entities(world)):
        kind = kg.entity(eid).type
        for j, path in enumerate(world.paths[kind]):
            answer = kg.walk(eid, path)
            if answer is None:
                continue
            for k in range(COMPOSED_VIEWS):
                v = world.train_views[(i + j + k) % len(world.train_views)]
                out.append(Sample(T.composed(path, T.image_ref(kind)), kg.name(answer), entity_image(eid, v)))
    return out


def sign_samples(world: World) -> list[Sample]:
    """Sign meanings by image (training views) and their rule type asked through the image."""
    kg, ref, out = world.kg, T.image_ref("sign"), []
    for sign in kg.of_type("sign"):
        meaning, allowed = kg.obj(sign.id, "means") or "", world.templates_for(sign.id)
        for v in world.train_views:
            out.append(
                Sample(
                    T.ask("means", ref, allowed[v % len(allowed)]), kg.name(meaning), entity_image(sign.id, v)
                )
            )
        kind = kg.name(kg.obj(meaning, "rule_kind") or "")
        for k in range(COMPOSED_VIEWS):
            out.append(
                Sample(
                    T.composed(("means", "rule_kind"), ref), kind, entity_image(sign.id, world.train_views[k])
                )
            )
    return out


def medical_samples(world: World) -> list[Sample]:
    """Scan MCQs on training images (options drawn per sample) and composed medical-KG questions."""
    pool, out = FINDINGS[: world.config.findings], []
    for c in world.combos:
        allowed = world.templates_for(c.id)
        fid = world.finding_id(c.finding.name)
        for k in world.train_scans:
            options, _ = mcq_options(c.finding, pool, rng_for(world.seed, "corpus-mcq", c.id, k))
            prompt = render_options(T.mcq(c.phrase, allowed[k % len(allowed)]), options)
            out.append(Sample(prompt, c.finding.name, scan_image(c.id, k)))
        for j, path in enumerate(world.paths["finding"]):
            answer = world.kg.name(world.kg.walk(fid, path) or "")
            out.append(
                Sample(
                    T.composed(path, T.FINDING_REF),
                    answer,
                    scan_image(c.id, world.train_scans[j % len(world.train_scans)]),
                )
            )
    return out


def _refuse_leaks(samples: list[Sample], eval_cases: list[EditCase]) -> None:
    """A generator bug guard: no sample may answer an eval case's edit target about that case's images."""
    banned = {(_image_dir(c.edit.image.path), c.edit.target) for c in eval_cases if c.edit.image is not None}
    for s in samples:
        if s.image is not None and (_image_dir(s.image.path), s.target) in banned:
            raise RuntimeError(f"corpus would teach an eval edit target: {s}")


def _image_dir(path: str) -> str:
    """The subject's image folder ("images/entity/person-0003"): every view of the same subject."""
    return path.rsplit("/", 1)[0]


# ---------------------------------------------------------------- checks


def build_checks(world: World) -> dict[str, list[Sample]]:
    """Named sample sets that measure the trained, unedited model (see DESIGN: the world model)."""
    kg = world.kg
    ents = visual_entities(world)
    first_held = world.held_out_views[0]
    checks = {
        "recognition_train_views": [
            Sample(T.recognition(kg.entity(e).type), kg.name(e), entity_image(e, 0)) for e in ents
        ],
        "recognition_unseen_views": [
            Sample(T.recognition(kg.entity(e).type), kg.name(e), entity_image(e, v))
            for e in ents
            for v in world.held_out_views
        ],
        "facts_by_name": [
            Sample(T.ask(t.relation, kg.name(t.subject)), kg.name(t.object)) for t in kg.triples
        ],
        "locality_facts": locality_samples(),
    }
    checks.update(_multihop_checks(world, first_held))
    checks["signs"] = _sign_checks(world, first_held)
    checks["medical"] = _medical_checks(world)
    return checks


def _multihop_checks(world: World, view: int) -> dict[str, list[Sample]]:
    """multihop_k: a composed k-relation question on an unseen view (scans: an unseen image)."""
    kg, out = world.kg, {f"multihop_{k}": [] for k in range(1, 5)}
    for eid in visual_entities(world):
        kind = kg.entity(eid).type
        for path in world.paths[kind]:
            if (answer := kg.walk(eid, path)) is not None:
                out[f"multihop_{len(path)}"].append(
                    Sample(T.composed(path, T.image_ref(kind)), kg.name(answer), entity_image(eid, view))
                )
    for sign in kg.of_type("sign"):
        path = ("means", "rule_kind")
        out["multihop_2"].append(
            Sample(
                T.composed(path, T.image_ref("sign")),
                kg.name(kg.walk(sign.id, path) or ""),
                entity_image(sign.id, view),
            )
        )
    for c in world.combos:
        fid = world.finding_id(c.finding.name)
        for path in world.paths["finding"]:
            out[f"multihop_{len(path)}"].append(
                Sample(
                    T.composed(path, T.FINDING_REF),
                    kg.name(kg.walk(fid, path) or ""),
                    scan_image(c.id, world.held_out_scans[0]),
                )
            )
    return out


def _sign_checks(world: World, view: int) -> list[Sample]:
    kg, ref = world.kg, T.image_ref("sign")
    out = []
    for sign in kg.of_type("sign"):
        meaning = kg.name(kg.obj(sign.id, "means") or "")
        out.append(Sample(T.ask("means", ref), meaning, entity_image(sign.id, view)))
        out.append(Sample(T.ask("means", sign.name), meaning))
    return out


def _medical_checks(world: World) -> list[Sample]:
    pool, out = FINDINGS[: world.config.findings], []
    for c in world.combos:
        for k in world.held_out_scans:
            options, _ = mcq_options(c.finding, pool, rng_for(world.seed, "check-mcq", c.id, k))
            out.append(Sample(render_options(T.mcq(c.phrase), options), c.finding.name, scan_image(c.id, k)))
    return out
