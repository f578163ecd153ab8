"""The construction pipeline: shared steps, the world built as a pipeline, the medical example end to end."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mmke.cli import main
from mmke.data.build import Pipeline, Step, open_draft, run_pipeline, run_step
from mmke.data.build import steps as build_steps
from mmke.data.build.review import Decision, read_items, save_decisions
from mmke.data.kg.adversarial import AttackParts, attacks
from mmke.data.kg.counterfactual import embed_texts, match_entities
from mmke.data.kg.multihop import TripleGraph, hop_questions, portability_paths
from mmke.data.schema import read_cases
from mmke.data.seeding import rng_for
from mmke.data.world import WorldConfig, build_world
from mmke.errors import BadRecordError, ConfigError, UnknownNameError
from mmke.types import AttackType, ProbeKind

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MEDICAL = EXAMPLES / "pipelines" / "medical.yaml"


def tree_hash(root: Path) -> str:
    """One hash over every file's relative path and bytes (what "the same world" means)."""
    h = hashlib.sha256()
    for p in sorted(x for x in root.rglob("*") if x.is_file() and ".build" not in x.parts):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------- the world as a pipeline


def test_world_yaml_spells_out_the_world_build(tmp_path: Path) -> None:
    """The shipped example is the default world pipeline; a small one gives build_world's bytes."""
    pipe = Pipeline.read(EXAMPLES / "pipelines" / "world.yaml")
    assert (pipe.name, pipe.seed) == ("world", 0)
    assert [s.name for s in pipe.steps] == ["world_plan", "world_images", "world_cases", "world_corpus"]
    assert dict(pipe.steps[0].params) == {"preset": "default"}

    small = tmp_path / "small.yaml"
    small.write_text(
        (EXAMPLES / "pipelines" / "world.yaml").read_text().replace("preset: default", "preset: small")
    )
    piped = Pipeline.read(small)
    run_pipeline(Pipeline(piped.name, piped.steps, 3, piped.base), tmp_path / "a")
    build_world(tmp_path / "b", seed=3, config=WorldConfig.small())
    assert tree_hash(tmp_path / "a") == tree_hash(tmp_path / "b")
    assert (tmp_path / "a" / "cases_eval.jsonl").stat().st_size > 0


def test_world_steps_refuse_to_run_out_of_order(tmp_path: Path) -> None:
    from mmke.data.build import Context

    with pytest.raises(ConfigError, match="world_plan"):
        run_step(Context(tmp_path), Step("world_cases"))


# ---------------------------------------------------------------- counterfactuals


def test_nearest_option_is_the_most_similar_other_text() -> None:
    table = {"cat": [1.0, 0.0], "kitten": [0.9, 0.1], "truck": [0.0, 1.0]}

    def embed(texts: list[str]) -> np.ndarray:
        return np.array([table[t] for t in texts], dtype=np.float32)

    near = embed_texts(["cat", "kitten", "truck", "cat"], embed)
    assert near.most_similar("cat", ["truck", "kitten"]) == "kitten"
    assert near.most_similar("truck", ["cat", "kitten"]) == "kitten"


def test_matching_is_same_type_distinct_and_optimal() -> None:
    type_of = {"p1": "person", "p2": "person", "p3": "person", "c1": "city", "c2": "city"}
    rels = {
        "p1": frozenset({"born_in", "works_for"}),
        "p2": frozenset({"born_in", "works_for"}),
        "p3": frozenset({"born_in"}),
        "c1": frozenset({"located_in"}),
        "c2": frozenset({"located_in"}),
    }
    subjects = ["p1", "p2", "p3", "c1"]
    chosen = match_entities(subjects, type_of, rels, rng_for(0, "t"))
    assert all(type_of[s] == type_of[t] and s != t for s, t in chosen.items())
    people = [chosen[s] for s in ("p1", "p2", "p3")]
    assert len(set(people)) == 3

    def total(assignment: dict[str, str]) -> int:
        return sum(len(rels[s] & rels[t]) for s, t in assignment.items())

    best = max(
        total(dict(zip(["p1", "p2", "p3"], perm, strict=True)))
        for perm in itertools.permutations(["p1", "p2", "p3"])
        if all(a != b for a, b in zip(["p1", "p2", "p3"], perm, strict=True))
    )
    assert total({s: chosen[s] for s in ("p1", "p2", "p3")}) == best


# ---------------------------------------------------------------- multi-hop and attacks


@pytest.fixture
def kg_file(tmp_path: Path) -> Path:
    path = tmp_path / "kg.tsv"
    path.write_text(
        "subject\trelation\tobject\n"
        "cyst\ttreated_with\taspiration\n"
        "stone\ttreated_with\tlithotripsy\n"
        "aspiration\tmanaged_by\tradiologist\n"
        "lithotripsy\tmanaged_by\turologist\n"
        "radiologist\tworks_in\timaging\n"
        "urologist\tworks_in\turology\n"
        "stone\tseen_on\tct\n"
        "stone\tseen_on\txray\n"
    )
    return path


PHRASES = {
    "treated_with": "the treatment of {x}",
    "managed_by": "the specialist for {x}",
    "works_in": "the department of {x}",
    "seen_on": "the modality of {x}",
}


def test_multihop_questions_walk_the_graph_and_never_name_the_hops(kg_file: Path) -> None:
    g = TripleGraph.read_tsv(kg_file)
    paths = g.paths_from("stone")
    assert ("seen_on",) not in paths  # two objects: no single answer
    assert paths == [
        ("treated_with",),
        ("treated_with", "managed_by"),
        ("treated_with", "managed_by", "works_in"),
    ]
    qs = hop_questions(g, paths, "stone", "the finding in the image", PHRASES)
    assert [a for _, _, a in qs] == ["lithotripsy", "urologist", "urology"]
    q3 = qs[2][1]
    assert q3 == "what is the department of the specialist for the treatment of the finding in the image ?"
    assert "lithotripsy" not in q3 and "urologist" not in q3
    # paths whose answer differs from the old entity's come first
    assert portability_paths(g, paths, "stone", "cyst", 1) == paths


def test_bad_kg_rows_name_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\tc\nonly\ttwo\n")
    with pytest.raises(BadRecordError, match=r"bad\.tsv:2"):
        TripleGraph.read_tsv(bad)


def test_five_attacks_keep_the_question() -> None:
    parts = AttackParts(old="cyst", similar="mass", context="the patient had a cold .", vague="roughly ?")
    out = dict(attacks("which finding ?", parts, detail=1))
    assert set(out) == set(AttackType)
    assert "cyst" in out[AttackType.PSEUDO_AUTHORITY] and "mass" in out[AttackType.FEATURE_CONFUSION]
    assert all(p.endswith("which finding ?") for k, p in out.items() if k != AttackType.VAGUE_WORDING)


# ---------------------------------------------------------------- the medical example end to end


@pytest.fixture(scope="module")
def medical(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("medical")
    run_pipeline(Pipeline.read(MEDICAL), out)
    return out


def test_medical_pipeline_writes_every_probe_kind(medical: Path) -> None:
    cases = read_cases(medical / "cases.jsonl", medical) + read_cases(medical / "cases_train.jsonl", medical)
    assert len(cases) == 24
    kg = TripleGraph.read_tsv(EXAMPLES / "data" / "medical" / "kg.tsv")
    items = {
        x["id"]: x
        for name in ("items.json", "items_train.json")
        for x in json.loads((medical / name).read_text())
    }
    for case in cases:
        kinds = {p.kind for p in case.probes}
        assert {
            ProbeKind.RELIABILITY,
            ProbeKind.TEXT_GENERALITY,
            ProbeKind.IMAGE_GENERALITY,
            ProbeKind.TEXT_LOCALITY,
            ProbeKind.IMAGE_LOCALITY,
            ProbeKind.PORTABILITY,
            ProbeKind.ROBUSTNESS,
        } <= kinds
        assert case.edit.target != case.edit.ground_truth and case.edit.target in case.edit.options
        assert {p.attack for p in case.probes_of(ProbeKind.ROBUSTNESS)} == set(AttackType)
        rec = items[case.meta["source_id"]]
        for port in rec["portability"]:
            assert kg.walk(rec["counterfactual"], tuple(port["path"].split(">"))) == port["answer"]
        gen = case.probes_of(ProbeKind.IMAGE_GENERALITY)[0]
        assert gen.image != case.edit.image
        assert items[Path(gen.image.path).stem]["answer"] == rec["answer"]  # same finding, another scan
        loc = case.probes_of(ProbeKind.IMAGE_LOCALITY)[0]
        assert items[Path(loc.image.path).stem]["answer"] != rec["answer"]
    assert (medical / "review_items.jsonl").is_file()


def test_a_rerun_reuses_cached_steps(medical: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = (medical / "cases.jsonl").read_bytes()

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("image embeddings should come from the cache")

    monkeypatch.setattr(build_steps, "_encode", boom)
    monkeypatch.setattr(build_steps, "_nearest_options", boom)
    run_pipeline(Pipeline.read(MEDICAL), medical)
    assert (medical / "cases.jsonl").read_bytes() == before


def test_review_decisions_are_honoured_by_the_next_build(medical: Path, tmp_path: Path) -> None:
    out = tmp_path / "reviewed"
    shutil.copytree(medical, out)
    ids = [r.id for r in read_items(out)]
    first = json.loads((out / "items.json").read_text())[0]["id"]
    second = next(i.split("/")[0] for i in ids if not i.startswith(first + "/"))
    save_decisions(
        out,
        {
            f"{first}/counterfactual": Decision("rejected"),
            f"{second}/rephrase": Decision("rejected"),
            f"{second}/portability/0": Decision(
                "edited", {"question": "what is the treatment of the finding in this picture ?"}
            ),
        },
    )
    run_pipeline(Pipeline.read(MEDICAL), out)
    items = {x["id"]: x for x in json.loads((out / "items.json").read_text())}
    items.update({x["id"]: x for x in json.loads((out / "items_train.json").read_text())})
    assert first not in items and len(items) == 23
    assert "rephrase" not in items[second]
    assert items[second]["portability"][0]["question"].endswith("in this picture ?")


def test_steps_run_one_at_a_time_from_the_cli(tmp_path: Path) -> None:
    data = EXAMPLES / "data" / "medical"
    out = tmp_path / "b"
    assert main(["build", "read_mcq_csv", str(out), f"path={data / 'items.csv'}", f"image_root={data}"]) == 0
    assert main(["build", "adversarial", str(out), "vague=so what is it ?"]) != 0  # needs counterfactuals
    assert main(["build", "counterfactual", str(out)]) == 0
    assert main(["build", "adversarial", str(out), "vague=so what is it ?"]) == 0
    items = open_draft(out).items
    assert len(items) == 24 and all(len(x["adversarial"]) == 5 for x in items)


# ---------------------------------------------------------------- bad input


def test_bad_rows_name_file_line_and_item(tmp_path: Path) -> None:
    data = EXAMPLES / "data" / "medical"
    rows = (data / "items.csv").read_text().splitlines()
    cases = {
        "missing": (rows[1].replace("images/ct-chest-mass.png", "images/nope.png"), "not found"),
        "escape": (rows[1].replace("images/ct-chest-mass.png", "../secret.png"), "escapes"),
        "answer": (rows[1].replace(",A", ",Z"), "not one of the options"),
    }
    for name, (row, why) in cases.items():
        csv = tmp_path / f"{name}.csv"
        csv.write_text(rows[0] + "\n" + row + "\n")
        pipe = Pipeline("t", (Step("read_mcq_csv", {"path": str(csv), "image_root": str(data)}),))
        with pytest.raises(BadRecordError, match=rf"{name}\.csv:2 \(ct-chest-mass\): .*{why}"):
            run_pipeline(pipe, tmp_path / name)


def test_unknown_steps_and_settings_are_named(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'rephrase'"):
        run_pipeline(Pipeline("t", (Step("rephrasee"),)), tmp_path)
    with pytest.raises(ConfigError, match="settings: generator, retries"):
        run_pipeline(Pipeline("t", (Step("rephrase", {"backend": "x"}),)), tmp_path)
    bad = tmp_path / "p.yaml"
    bad.write_text("name: x\nstep: []\n")
    with pytest.raises(ConfigError, match="steps"):
        Pipeline.read(bad)


def test_generation_failures_are_reported_not_dropped(tmp_path: Path) -> None:
    """An endpoint that refuses every request: each item is listed in failures.jsonl, none is lost."""
    data = EXAMPLES / "data" / "medical"
    pipe = Pipeline(
        "t",
        (
            Step("read_mcq_csv", {"path": str(data / "items.csv"), "image_root": str(data)}),
            Step(
                "rephrase",
                {
                    "generator": {
                        "backend": "http",
                        "url": "http://127.0.0.1:9/v1",
                        "model": "m",
                        "timeout": 1,
                    },
                    "retries": 0,
                },
            ),
        ),
    )
    ctx = run_pipeline(pipe, tmp_path)
    failures = [json.loads(x) for x in (tmp_path / ".build" / "failures.jsonl").read_text().splitlines()]
    assert len(ctx.items) == 24 and len(failures) == 24
    assert {f["item"] for f in failures} == {x["id"] for x in ctx.items}
    assert not any("rephrase" in x for x in ctx.items)


def test_a_corrupt_image_is_named(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.png").write_bytes(b"not a png")
    csv = tmp_path / "rows.csv"
    csv.write_text("id,image,question,options,answer\nq1,images/x.png,what is it ?,a|b,a\n")
    pipe = Pipeline("t", (Step("read_mcq_csv", {"path": str(csv), "image_root": str(tmp_path)}),))
    with pytest.raises(BadRecordError, match=r"rows\.csv:2 \(q1\): .*x\.png"):
        run_pipeline(pipe, tmp_path / "out")


def test_text_locality_questions_can_come_from_a_generator(tmp_path: Path, kg_file: Path) -> None:
    items = [
        {"id": "q1", "answer": "cyst", "counterfactual": "stone", "options": {"A": "cyst", "B": "stone"}}
    ]
    from mmke.data.build import Context

    ctx = Context(tmp_path)
    ctx.artifacts["items"] = items
    run_step(
        ctx, Step("text_locality", {"kg": str(kg_file), "generator": {"backend": "templates"}, "per_item": 2})
    )
    locality = ctx.items[0]["locality"]
    assert len(locality) == 2
    g = TripleGraph.read_tsv(kg_file)
    for loc in locality:
        assert loc["answer"] not in loc["question"] and loc["question"].endswith("?")
        assert any(g.walk(s, (r,)) == loc["answer"] for s, r, _ in g.triples if s in loc["question"])
        assert "cyst" not in loc["question"] and "stone" not in loc["question"]
    with pytest.raises(ConfigError, match="either phrases or generator"):
        run_step(ctx, Step("text_locality", {"kg": str(kg_file)}))


def test_the_medical_build_runs_through_mmke_run(medical: Path, tmp_path: Path) -> None:
    args = [
        "run",
        f"benchmark=native:{medical / 'cases.jsonl'}",
        f"benchmark_options.train={medical / 'cases_train.jsonl'}",
        "methods=[ft_llm,ike]",
        "limit=2",
        f"out={tmp_path}",
    ]
    assert main(args) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    records = [json.loads(x) for x in (run / "cases.jsonl").read_text().splitlines()]
    assert {r["run"]["method"] for r in records} == {"ft_llm", "ike"}
    assert {r["run"]["benchmark"] for r in records} == {"medical-demo"} and len(records) == 4


def test_the_shipped_world_pipeline_gives_the_world_bytes(tmp_path: Path) -> None:
    """Done-when of the construction issue, literally: the example file against `mmke build world`."""
    assert (
        main(["build", "pipeline", str(EXAMPLES / "pipelines" / "world.yaml"), "--out", str(tmp_path / "p")])
        == 0
    )
    assert main(["build", "world", "--out", str(tmp_path / "w"), "--seed", "0"]) == 0
    assert tree_hash(tmp_path / "p") == tree_hash(tmp_path / "w")
