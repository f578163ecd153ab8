"""The generated world: counts, determinism, valid case files, KG-consistent probes, no corpus leaks."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmke.data.schema import read_cases, read_samples, validate
from mmke.data.world import KnowledgeGraph, WorldConfig, build_world, load_kg, world_stats
from mmke.data.world import _templates as T
from mmke.data.world._assign import entity_score
from mmke.data.world._common import rng_for
from mmke.data.world._medical import FINDINGS, most_similar
from mmke.data.world._plan import plan_world
from mmke.data.world._render import View, render_entity, render_sign
from mmke.data.world._visual import hamming
from mmke.errors import BadRecordError, ConfigError
from mmke.types import AttackType, EditCase, EditType, ProbeKind, Sample

CHECKS = (
    "recognition_train_views",
    "recognition_unseen_views",
    "facts_by_name",
    "locality_facts",
    "multihop_1",
    "multihop_2",
    "multihop_3",
    "multihop_4",
    "signs",
    "medical",
)
_TEXT = re.compile(r"^[a-z]+( [a-z?.,:]+)*$")


# ---------------------------------------------------------------- fixtures (each world is built once)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small") / "world"
    build_world(out, seed=0, config=WorldConfig.small())
    return out


@pytest.fixture(scope="module")
def small_again(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small_again") / "world"
    build_world(out, seed=0, config=WorldConfig.small())
    return out


@pytest.fixture(scope="module")
def small_seed1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small_seed1") / "world"
    build_world(out, seed=1, config=WorldConfig.small())
    return out


@pytest.fixture(scope="module")
def default(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("default") / "world"
    return out, build_world(out, seed=0)


@dataclass
class Built:
    """A built world read back once: its folder, cases, corpus, KG and world.json."""

    out: Path
    eval: list[EditCase]
    train: list[EditCase]
    corpus: list[Sample]
    kg: KnowledgeGraph
    meta: dict
    #: MultiMedEdit's reasoning cases (eval only), kept apart: their checks are their own.
    reasoning: list[EditCase]

    @property
    def cases(self) -> list[EditCase]:
        return self.eval + self.train


@pytest.fixture(scope="module", params=["small", "default"])
def built(request: pytest.FixtureRequest) -> Built:
    """Content checks run on the fast world and on the default benchmark."""
    got = request.getfixturevalue(request.param)
    out = got[0] if isinstance(got, tuple) else got
    corpus = read_samples(out / "corpus_train.jsonl")
    evals = _cases(out, "eval")
    return Built(
        out,
        [c for c in evals if c.task != "reasoning"],
        _cases(out, "train"),
        corpus,
        load_kg(out),
        _world_json(out),
        [c for c in evals if c.task == "reasoning"],
    )


def _cases(out: Path, split: str = "eval") -> list[EditCase]:
    return read_cases(out / f"cases_{split}.jsonl", root=out)


def _world_json(out: Path) -> dict:
    return json.loads((out / "world.json").read_text(encoding="utf-8"))


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- the issue's counts (default world)


def test_default_world_has_the_issue_counts(default: tuple[Path, dict]) -> None:
    out, stats = default
    assert stats["n_entities"] >= 400 and stats["n_types"] >= 6 and stats["n_relation_types"] >= 10
    assert stats["eval"]["n_cases"] >= 300 and stats["train"]["n_cases"] >= 1000
    assert set(stats["eval"]["cases"]) == {e.value for e in EditType}
    assert set(stats["train"]["cases"]) == {e.value for e in EditType}
    # the newer benchmarks' kinds (KGI/KPI, CCKEB's textual edit, MMQAKE's steps) are read, not generated
    foreign = {"in_domain_generality", "in_domain_locality", "compositional", "hop_step"}
    foreign |= {f"textual_edit_{k}" for k in ("reliability", "generality", "locality")}
    assert set(stats["eval"]["probes"]) == {k.value for k in ProbeKind} - foreign
    assert set(stats["eval"]["portability_hops"]) == {"1", "2", "3", "4"}
    assert set(stats["eval"]["robustness_attacks"]) == {a.value for a in AttackType}
    assert 10_000 <= stats["corpus"]["corpus_train"] <= 40_000
    assert stats["bytes"] < 30_000_000
    views = Counter(p.parent.name for p in (out / "images" / "entity").rglob("*.png"))
    assert min(views.values()) >= 12
    assert stats == world_stats(out)


def test_default_world_case_mix_follows_the_issue(default: tuple[Path, dict]) -> None:
    cases = default[1]["eval"]["cases"]
    assert cases["visual_entity"] >= 150 and cases["medical_mcq"] >= 50
    assert cases["visual_semantic"] >= 30 and cases["user_specific"] >= 30


# ---------------------------------------------------------------- determinism


def test_same_seed_gives_identical_bytes(small: Path, small_again: Path) -> None:
    a, b = _files(small), _files(small_again)
    assert list(a) == list(b)
    assert [k for k in a if a[k] != b[k]] == []


def test_different_seed_gives_a_different_world(small: Path, small_seed1: Path) -> None:
    a, b = _files(small), _files(small_seed1)
    for name in ("world.json", "cases_eval.jsonl", "corpus_train.jsonl", "images/entity/person-0000/v03.png"):
        assert a[name] != b[name], name


def test_rebuilding_into_the_same_folder_replaces_it(tmp_path: Path, small: Path) -> None:
    out = tmp_path / "w"
    build_world(out, seed=1, config=WorldConfig.small())
    build_world(out, seed=0, config=WorldConfig.small())
    assert _files(out) == _files(small)


# ---------------------------------------------------------------- files are valid


def test_case_files_validate_with_the_images_root(built: Built) -> None:
    for split in ("eval", "train"):
        assert validate(built.out / f"cases_{split}.jsonl", root=built.out) == []
        head = json.loads((built.out / f"cases_{split}.jsonl").read_text(encoding="utf-8").splitlines()[0])
        assert head["benchmark"] == "world" and head["split"] == split and head["seed"] == 0


def test_stats_match_the_config(small: Path) -> None:
    c, stats = WorldConfig.small(), world_stats(small)
    assert stats["eval"]["cases"] == {
        "visual_entity": c.eval_visual_entity,
        "visual_semantic": c.eval_visual_semantic,
        "user_specific": c.eval_user_specific,
        "medical_mcq": c.eval_medical + c.eval_medical_reasoning,
    }
    assert stats["train"]["n_cases"] == (
        c.train_visual_entity + c.train_visual_semantic + c.train_user_specific + c.train_medical
    )
    assert stats["images"] == len(list((small / "images").rglob("*.png")))
    assert all(stats["corpus"][f"checks/{name}"] > 0 for name in CHECKS)


def test_case_ids_are_stable_unique_and_subjects_disjoint(built: Built) -> None:
    ids = [c.case_id for c in built.cases]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"world/(eval|train)/(ve|vs|us|med)-\d{4}", i) for i in ids)
    assert [c.case_id for c in built.reasoning] == [
        f"world/eval/medr-{i:04d}" for i in range(len(built.reasoning))
    ]
    assert built.eval[0].case_id == "world/eval/ve-0000"
    assert {c.subject for c in built.eval}.isdisjoint({c.subject for c in built.train})
    assert {c.subject for c in built.eval} == {s for ss in built.meta["splits"]["eval"].values() for s in ss}


def test_images_are_small_rgb_pngs(small: Path) -> None:
    for p in sorted((small / "images").rglob("*.png"))[::37]:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (64, 64)
            assert not {k for k in im.info if k != "dpi"}  # no text chunks, no timestamps


def test_all_text_is_plain_lowercase_words(built: Built) -> None:
    texts = [x for s in built.corpus for x in (s.prompt, s.target)]
    for c in built.cases:
        texts += [c.edit.prompt, c.edit.target] + [x for p in c.probes for x in (p.prompt, p.target)]
        assert all(1 <= len(p.target.split()) <= 3 for p in c.probes)
    assert [t for t in texts if not _TEXT.match(t)] == []


def test_corpus_is_consistent_so_it_can_be_learnt_perfectly(built: Built) -> None:
    """One question (with its image) never has two answers in the corpus."""
    answers: dict[tuple[str, str | None], set[str]] = {}
    for s in built.corpus:
        answers.setdefault((s.prompt, s.image.path if s.image else None), set()).add(s.target)
    assert [k for k, v in answers.items() if len(v) > 1] == []


def test_bad_config_and_missing_world_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train_views"):
        build_world(tmp_path / "w", config=WorldConfig(train_views=12))
    with pytest.raises(ConfigError, match="seed"):
        build_world(tmp_path / "w", seed=-1, config=WorldConfig.small())
    with pytest.raises(BadRecordError, match="build_world"):
        load_kg(tmp_path / "nowhere")


# ---------------------------------------------------------------- KG consistency of the cases


def test_kg_is_functional_and_names_are_unique(built: Built) -> None:
    kg = built.kg
    assert len({(t.subject, t.relation) for t in kg.triples}) == len(kg.triples)
    names = [e.name for e in kg.entities]
    assert len(names) == len(set(names))
    assert {u["name"] for u in built.meta["user_items"]}.isdisjoint(names)


def test_portability_answers_walk_the_kg_from_the_new_entity(built: Built) -> None:
    kg = built.kg
    for c in built.cases:
        port = c.probes_of(ProbeKind.PORTABILITY)
        assert port, c.case_id
        if c.edit_type == EditType.USER_SPECIFIC:
            assert [p.target for p in port] == [c.meta["kind"]]
            continue
        paths = c.meta["portability_paths"].split(";")
        assert len(paths) == len(port)
        for probe, path in zip(port, paths, strict=True):
            rels = tuple(path.split(">"))
            assert probe.hop == len(rels)
            assert probe.target == kg.name(kg.walk(c.meta["new_entity"], rels) or "")
            assert (probe.onehop_edit is not None) == (probe.hop == 1)
            if probe.onehop_edit:
                assert probe.onehop_edit.target == kg.name(kg.obj(c.meta["new_entity"], rels[0]) or "")
                assert kg.name(c.meta["new_entity"]) in probe.onehop_edit.prompt
                assert probe.onehop_edit.image is None


def test_portability_questions_never_name_intermediate_entities(built: Built) -> None:
    names = {e.name for e in built.kg.entities}
    for c in built.eval:
        if c.edit_type == EditType.USER_SPECIFIC:
            continue
        for p in c.probes_of(ProbeKind.PORTABILITY):
            assert p.image is not None
            assert not [n for n in names if f" {n} " in f" {p.prompt} "], p.prompt


def test_counterfactual_targets_are_same_type_and_not_the_truth(built: Built) -> None:
    kg = built.kg
    for c in built.cases:
        if c.edit_type == EditType.USER_SPECIFIC:
            assert c.edit.ground_truth is None
            assert c.probes_of(ProbeKind.TEXT_RELIABILITY) and c.probes_of(ProbeKind.IMAGE_RELIABILITY)
            continue
        old, new = kg.entity(c.meta["old_entity"]), kg.entity(c.meta["new_entity"])
        assert old.type == new.type and old.id != new.id
        assert c.edit.target == new.name != c.edit.ground_truth == old.name
        if c.edit_type == EditType.VISUAL_ENTITY:
            assert c.subject == old.id and new.id != kg.similar[old.id]


def test_entity_targets_are_an_optimal_assignment(built: Built) -> None:
    """No two eval cases would score higher (shared relation types first) by swapping their targets."""
    world = plan_world(WorldConfig.from_json(built.meta["config"]), built.meta["seed"])
    kg, score = world.kg, entity_score(world)
    ve = [c for c in built.eval if c.edit_type == EditType.VISUAL_ENTITY]
    for a in ve:
        for b in ve:
            sa, sb, ta, tb = a.subject or "", b.subject or "", a.meta["new_entity"], b.meta["new_entity"]
            if a is b or kg.entity(sa).type != kg.entity(sb).type:
                continue
            if tb in (sa, kg.similar[sa]) or ta in (sb, kg.similar[sb]):
                continue  # the swap is not allowed
            assert score(sa, ta) + score(sb, tb) >= score(sa, tb) + score(sb, ta) - 0.01


def test_medical_counterfactual_is_the_most_similar_option(built: Built) -> None:
    by_name = {f.name: f for f in FINDINGS}
    for c in built.cases:
        if c.edit_type != EditType.MEDICAL_MCQ:
            continue
        opts = list(c.edit.options)
        assert len(opts) == 4 and c.edit.ground_truth in opts and c.edit.target in opts
        assert all(f" {o} " in c.edit.prompt for o in opts)
        truth = by_name[c.edit.ground_truth or ""]
        assert c.edit.target == most_similar(truth, [by_name[o] for o in opts]).name
        for p in c.probes_of(ProbeKind.ROBUSTNESS) + c.probes_of(ProbeKind.TEXT_GENERALITY):
            assert p.options == c.edit.options and p.target == c.edit.target


def test_every_case_has_every_attack_and_the_right_probe_kinds(built: Built) -> None:
    need = {
        EditType.VISUAL_ENTITY: {
            ProbeKind.RELIABILITY,
            ProbeKind.TEXT_GENERALITY,
            ProbeKind.IMAGE_GENERALITY,
        },
        EditType.VISUAL_SEMANTIC: {ProbeKind.TEXT_RELIABILITY, ProbeKind.IMAGE_RELIABILITY},
        EditType.USER_SPECIFIC: {ProbeKind.TEXT_RELIABILITY, ProbeKind.IMAGE_RELIABILITY},
        EditType.MEDICAL_MCQ: {ProbeKind.RELIABILITY, ProbeKind.TEXT_GENERALITY, ProbeKind.IMAGE_GENERALITY},
    }
    common = {ProbeKind.TEXT_LOCALITY, ProbeKind.IMAGE_LOCALITY, ProbeKind.PORTABILITY}
    for c in built.cases:
        assert need[c.edit_type] | common <= {p.kind for p in c.probes}, c.case_id
        assert [p.attack for p in c.probes_of(ProbeKind.ROBUSTNESS)] == list(AttackType)
        assert all(p.target == c.edit.target for p in c.probes_of(ProbeKind.ROBUSTNESS))


def test_image_locality_uses_the_designated_look_alike(built: Built) -> None:
    kg = built.kg
    for c in built.cases:
        if c.edit_type not in (EditType.VISUAL_ENTITY, EditType.VISUAL_SEMANTIC):
            continue
        sim = kg.similar[c.subject or ""]
        assert c.meta["similar_entity"] == sim
        (loc,) = c.probes_of(ProbeKind.IMAGE_LOCALITY)
        assert loc.image is not None and loc.image.path.startswith(f"images/entity/{sim}/")
        want = kg.name(sim) if c.edit_type == EditType.VISUAL_ENTITY else kg.name(kg.obj(sim, "means") or "")
        assert loc.target == want


def test_look_alikes_differ_in_one_attribute_and_stay_distinguishable(built: Built) -> None:
    """Twins differ in one attribute, still visible at 32x32 (same pose, same background, no noise)."""
    kg = built.kg
    pairs = [(a, b) for a, b in kg.similar.items() if kg.similar[b] == a and a < b]
    assert len(pairs) >= len(kg.visual) // 2 - 6  # an odd type count leaves one unpaired entity
    for a, b in pairs:
        assert hamming(kg.visual[a], kg.visual[b]) == 1
        kind = kg.entity(a).type
        ims = []
        for x in (a, b):
            rng = rng_for(0, "same-background")
            img = render_sign(kg.visual[x], View(), 64, rng) if kind == "sign" else None
            img = img or render_entity(kind, kg.visual[x], View(), 64, rng)
            ims.append(np.asarray(img.resize((32, 32))).astype(int))  # (32, 32, 3)
        strong = (np.abs(ims[0] - ims[1]).max(axis=2) > 40).sum()
        assert strong >= 8, (a, b, strong)


def test_generality_uses_held_out_views_and_templates(built: Built) -> None:
    views = built.meta["views"]
    held = {f"v{v:02d}.png" for v in views["held_out"]} | {f"i{v:02d}.png" for v in views["scan_held_out"]}
    for c in built.eval:
        for p in c.probes_of(ProbeKind.IMAGE_GENERALITY):
            assert p.image is not None and c.edit.image is not None and p.image.path != c.edit.image.path
            if c.edit_type != EditType.USER_SPECIFIC:
                assert p.image.path.rsplit("/", 1)[1] in held
        for p in c.probes_of(ProbeKind.TEXT_GENERALITY):
            assert p.prompt != c.edit.prompt


# ---------------------------------------------------------------- the corpus is the pre-edit knowledge


def _held_out_patterns() -> list[tuple[re.Pattern[str], bool]]:
    """(regex with an optional subject group, whether options may follow it: MCQ prompts)."""

    def rx(template: str, slot: str) -> str:
        return re.escape(template).replace(re.escape(slot), "(.+)")

    out = [
        (re.compile(rx(T.RECOGNITION[T.HELD_OUT].replace("{t}", t), "@")), False)
        for t in T.TYPE_NOUN.values()
    ]
    out += [(re.compile(rx(T.relation_templates(r)[T.HELD_OUT], "{x}")), False) for r in T.RELATION_TEXT]
    out.append((re.compile(rx(T.MCQ[T.HELD_OUT], "{s}")), True))
    return out


def test_held_out_templates_never_meet_eval_subjects_in_the_corpus(built: Built) -> None:
    eval_subjects = {s for ss in built.meta["splits"]["eval"].values() for s in ss}
    by_name = {e.name: e.id for e in built.kg.entities}
    patterns, seen = _held_out_patterns(), Counter()
    for s in built.corpus:
        for pat, prefix in patterns:
            m = pat.match(s.prompt) if prefix else pat.fullmatch(s.prompt)
            if m:
                # the subject is the pictured entity (images/<kind>/<subject>/...) or the named one
                subject = s.image.path.split("/")[2] if s.image else by_name[m.group(1)]
                assert subject not in eval_subjects, s
                seen[pat.pattern] += 1
    assert len(seen) >= 10  # the model does learn the held-out wordings, with other subjects


def test_corpus_never_teaches_an_eval_edit_target_for_its_images(built: Built) -> None:
    taught: dict[str, set[str]] = {}
    for s in built.corpus:
        if s.image is not None:
            taught.setdefault(s.image.path.rsplit("/", 1)[0], set()).add(s.target)
    for c in built.eval:
        assert c.edit.image is not None
        assert c.edit.target not in taught.get(c.edit.image.path.rsplit("/", 1)[0], set()), c.case_id


def test_corpus_uses_training_views_only_and_user_names_only_as_bare_words(built: Built) -> None:
    views = built.meta["views"]
    train = {f"v{v:02d}.png" for v in views["train"]} | {f"i{v:02d}.png" for v in views["scan_train"]}
    users = {u["name"] for u in built.meta["user_items"]}
    lexicon = set()
    for s in built.corpus:
        if s.image is not None:
            assert s.image.path.rsplit("/", 1)[1] in train and not s.image.path.startswith("images/user/")
        if users & set(f"{s.prompt} {s.target}".split()):  # no fact about a user item, only its name
            assert s.image is None and s.prompt == T.LEXICON.format(w=s.target)
            lexicon.add(s.target)
    assert lexicon == users
    kg = built.kg
    facts = {(s.prompt, s.target) for s in built.corpus if s.image is None}
    for t in kg.triples:  # every fact of every entity, counterfactual targets included
        assert (T.ask(t.relation, kg.name(t.subject)), kg.name(t.object)) in facts


def test_checks_cover_the_pre_edit_measurements(built: Built) -> None:
    kg, out = built.kg, built.out
    for name in CHECKS:
        assert read_samples(out / "checks" / f"{name}.jsonl"), name
    unseen = read_samples(out / "checks" / "recognition_unseen_views.jsonl")
    assert all(s.image is not None and kg.name(s.image.path.split("/")[2]) == s.target for s in unseen)
    for k in range(1, 5):
        for s in read_samples(out / "checks" / f"multihop_{k}.jsonl"):
            assert s.image is not None and s.prompt.split().count("the") - 2 == k, s.prompt
    vocab = set((out / "vocab.txt").read_text(encoding="utf-8").split())
    for c in built.eval:
        assert set(c.edit.prompt.split()) <= vocab and set(c.edit.target.split()) <= vocab


# ---------------------------------------------------------------- MultiMedEdit's task split, aliases


def test_reasoning_cases_ask_what_the_edited_finding_calls_for(built: Built) -> None:
    """A reasoning case writes the treatment of the finding its scan's understanding case writes:
    the edited finding plus one step of the world's medical knowledge."""
    treatment = {f.name: f.treatment for f in FINDINGS}
    understanding = {c.subject: c for c in built.eval if c.edit_type == EditType.MEDICAL_MCQ}
    assert built.reasoning and len(built.reasoning) == built.meta["config"]["eval_medical_reasoning"]
    assert {c.task for c in understanding.values()} == {"understanding"}
    assert all(c.task is None for c in built.eval if c.edit_type != EditType.MEDICAL_MCQ)
    taught = {s.prompt for s in built.corpus}
    for r in built.reasoning:
        u = understanding[r.subject]
        assert r.edit_type == EditType.MEDICAL_MCQ and r.edit.image == u.edit.image
        assert r.edit.options == tuple(treatment[o] for o in u.edit.options)
        assert (
            r.edit.target == treatment[u.edit.target] != r.edit.ground_truth == treatment[u.edit.ground_truth]
        )
        assert r.edit.prompt.split(" options :")[0] in taught  # the question the model was taught
        kinds = [p.kind for p in r.probes]
        assert set(kinds) == {
            ProbeKind.RELIABILITY,
            ProbeKind.TEXT_GENERALITY,
            ProbeKind.IMAGE_GENERALITY,
            ProbeKind.TEXT_LOCALITY,
            ProbeKind.IMAGE_LOCALITY,
        }
        (loc,) = r.probes_of(ProbeKind.IMAGE_LOCALITY)
        assert loc.target in loc.options and loc.target not in (r.edit.target, r.edit.ground_truth)


def test_entity_targets_carry_their_aliases(built: Built) -> None:
    kg = built.kg
    names = {e.name for e in kg.entities}
    by_name = {e.name: e for e in kg.entities}
    seen = 0
    for c in [*built.eval, *built.reasoning]:
        for p in c.probes:
            assert not (set(p.aliases) & names), (c.case_id, p.aliases)
            if p.kind in (ProbeKind.TEXT_LOCALITY, ProbeKind.IMAGE_LOCALITY):
                assert p.aliases == ()
                continue
            e = by_name.get(p.target)
            if e is not None and e.type == "person":
                assert p.aliases == (p.target.split()[1],)
                seen += 1
            if e is not None and e.type == "country":
                assert p.aliases == (f"republic of {p.target}",)
            if p.target == "fracture":
                assert p.aliases == ("break", "broken bone")
    assert seen > 0
