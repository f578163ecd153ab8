"""The ``mmqake`` reader: chains and their sub-questions as probes, options, bad records, M-Acc / H-Acc."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mmke.cli import main
from mmke.data.benchmark import Benchmark, load_benchmark
from mmke.errors import BadRecordError, ConfigError
from mmke.eval import ProbeResult, probe_result
from mmke.eval.metrics import case_values
from mmke.models.scoring import ItemScore
from mmke.types import EditCase, EditType, ImageRef, ProbeKind

FIXTURES = Path(__file__).parent / "fixtures" / "formats"
IMAGES = FIXTURES / "images"
FOLDER = FIXTURES / "mmqake"
EVAL = FOLDER / "convert_eval_multihop_with_re_questions_with_wiki_new.json"
TRAIN = FOLDER / "train.json"
STEM = EVAL.stem
K = ProbeKind
CITY, PERSON = ImageRef("m.0abc12/google_3.jpg"), ImageRef("m.0def34/google_1.jpg")
CITY_REPHRASED = ImageRef("m.0abc12/bing_7.jpg")


def _load(file: Path = EVAL, skip_bad: bool = False, **options: Any) -> Benchmark:
    return load_benchmark(f"mmqake:{file}", image_root=IMAGES, skip_bad=skip_bad, options=options)


def _chain(case: EditCase, hop: int) -> list[tuple[str, str, str, tuple[str, ...], int | None]]:
    """(kind, prompt, target, aliases, variant) of one chain's probes, in order."""
    return [
        (p.kind.value, p.prompt, p.target, p.aliases, p.variant)
        for p in case.probes
        if p.group == f"chain{hop}"
    ]


# ---------------------------------------------------------------- the mapping


def test_records_without_port_new_are_left_out_silently() -> None:
    bench = _load()
    assert bench.name == f"mmqake:{STEM}" and bench.skipped == ()
    assert [c.case_id for c in bench.cases] == [f"{STEM}-00000", f"{STEM}-00002"]
    assert [c.meta["source"] for c in bench.cases] == [f"{EVAL.name}:2", f"{EVAL.name}:21"]


def test_edit_and_base_probes_are_vlkebs() -> None:
    city, person = _load().cases
    assert {city.edit_type, person.edit_type} == {EditType.VISUAL_ENTITY}
    assert (city.edit.prompt, city.edit.target, city.edit.image, city.edit.ground_truth) == (
        "Which city is shown in the picture?",
        "Albany",
        CITY,
        "Denton,_Texas",
    )
    base = [(p.kind, p.prompt, p.target, p.image) for p in city.probes if p.group is None]
    assert base == [
        (K.RELIABILITY, "Which city is shown in the picture?", "Albany", CITY),
        (K.TEXT_GENERALITY, "What city does this image show?", "Albany", CITY),
        (K.IMAGE_GENERALITY, "Which city is shown in the picture?", "Albany", CITY_REPHRASED),
        (K.TEXT_LOCALITY, "nq question: who wrote the iliad", "Homer", None),
        (
            K.IMAGE_LOCALITY,
            "How many dogs are there?",
            "two",
            ImageRef("val2014/COCO_val2014_000000000001.jpg"),
        ),
    ]
    assert person.edit.target == "Mary Somerville"


def test_a_one_hop_chain_is_three_paraphrases_each_with_the_edit_as_step_one() -> None:
    city = _load().cases[0]
    state = ("New York", ("NY", "State of New York"))  # the blank alias "" is left out
    edit = ("hop_step", "Which city is shown in the picture?", "Albany", ())
    assert _chain(city, 1) == [
        ("portability", "Which state is the city in the image the capital of?", *state, 0),
        (*edit, 0),
        ("portability", "The city shown is the capital of which state?", *state, 1),
        (*edit, 1),
        ("portability", "Name the state whose capital appears in the picture.", *state, 2),
        (*edit, 2),
    ]
    chain = [p for p in city.probes if p.group == "chain1"]
    assert {(p.hop, p.image) for p in chain} == {(1, CITY)}


def test_a_two_hop_chain_asks_triple2_with_its_only_paraphrase_for_every_variant() -> None:
    city = _load().cases[0]
    governor = ("Kathy Hochul", ("Kathleen Hochul",))
    edit = ("hop_step", "Which city is shown in the picture?", "Albany", ())
    state = ("hop_step", "In which state is the city in the image?", "New York", ("NY",))
    assert _chain(city, 2) == [
        ("portability", "Who governs the state whose capital is shown?", *governor, 0),
        (*edit, 0),
        (*state, 0),
        ("portability", "Who is the governor of the state the pictured city leads?", *governor, 1),
        (*edit, 1),
        (*state, 1),
        (
            "portability",
            "Name the governor of the state with the city in the image as capital.",
            *governor,
            2,
        ),
        (*edit, 2),
        (*state, 2),
    ]
    assert {p.hop for p in city.probes if p.group == "chain2"} == {2}


def test_a_four_hop_chain_pairs_sub_questions_by_paraphrase_index() -> None:
    person = _load().cases[1]
    assert sorted({p.group for p in person.probes if p.group}) == ["chain1", "chain2", "chain3", "chain4"]
    finals = [(p.hop, p.variant) for p in person.probes if p.kind == K.PORTABILITY]
    assert finals == [(1, 0), (1, 1), (2, 0), (3, 0), (3, 1), (3, 2), (4, 0), (4, 1)]
    steps = [(p.prompt, p.target, p.aliases) for p in person.probes if p.group == "chain4" and p.variant == 1]
    assert steps == [
        (
            "What river runs through the capital of the country where the person shown was born?",
            "Water of Leith",
            ("the Leith",),
        ),
        ("Who is the person in the picture?", "Mary Somerville", ()),
        ("In which town was the pictured woman born?", "Jedburgh", ()),  # its paraphrase 1; no answer_ali
        ("Which country is Jedburgh in?", "Scotland", ("Alba",)),  # one paraphrase: index 0
        ("Which city is Scotland's capital?", "Edinburgh", ("Edina",)),
    ]
    assert {(p.hop, p.image) for p in person.probes if p.group == "chain4"} == {(4, PERSON)}


# ---------------------------------------------------------------- options


def test_rephrased_setting_asks_every_chain_question_on_image_rephrase() -> None:
    city = _load(image="rephrased").cases[0]
    assert {p.image for p in city.probes if p.group is not None} == {CITY_REPHRASED}
    assert city.probes_of(K.RELIABILITY)[0].image == CITY  # the edit and base probes are unchanged
    assert city.edit.image == CITY
    assert [p for p in _load(image="original").cases[0].probes if p.group] == [
        p for p in _load().cases[0].probes if p.group
    ]


def test_no_alias_setting_drops_answer_ali_everywhere() -> None:
    for case in _load(aliases=False).cases:
        assert {p.aliases for p in case.probes} == {()}
    assert [p.target for p in _load(aliases=False).cases[0].probes] == [
        p.target for p in _load().cases[0].probes
    ]


def test_train_split_and_option_checks() -> None:
    bench = _load(train=str(TRAIN))
    assert [c.edit.target for c in bench.train_cases] == ["London Bridge", "Lise Meitner"]
    assert [p.kind for p in bench.train_cases[0].probes] == [
        K.RELIABILITY,
        K.TEXT_GENERALITY,
        K.IMAGE_GENERALITY,
        K.TEXT_LOCALITY,
        K.IMAGE_LOCALITY,
    ]
    with pytest.raises(ConfigError, match="did you mean 'aliases'"):
        _load(alias=False)
    with pytest.raises(ConfigError, match="image='rephrase': expected one of original, rephrased"):
        _load(image="rephrase")
    with pytest.raises(ConfigError, match="aliases='no': expected true or false"):
        _load(aliases="no")


# ---------------------------------------------------------------- bad records


def _records() -> list[dict[str, Any]]:
    return json.loads(EVAL.read_text())


def _write(tmp_path: Path, records: list[dict[str, Any]]) -> Path:
    """One record per line, so record i starts on line i + 2."""
    path = tmp_path / "mmqake.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    return path


def _no_final_triple(rec: dict[str, Any]) -> None:
    del rec["port_new"][1]["triple3"]


def _no_sub_answer(rec: dict[str, Any]) -> None:
    del rec["port_new"][3]["triple3"]["answer"]


def _no_paraphrases(rec: dict[str, Any]) -> None:
    del rec["port_new"][0]["triple2"]["rewrite_question"]


def _one_string_paraphrase(rec: dict[str, Any]) -> None:
    rec["port_new"][0]["triple2"]["rewrite_question"] = "Where was the person born?"


def _empty_paraphrases(rec: dict[str, Any]) -> None:
    rec["port_new"][2]["triple4"]["rewrite_question"] = []


def _alias_not_a_list(rec: dict[str, Any]) -> None:
    rec["port_new"][1]["triple3"]["answer_ali"] = "Alba"


def _five_hop(rec: dict[str, Any]) -> None:
    rec["port_new"][3]["port_type"] = "5-hop"


def _two_chains_of_one_hop(rec: dict[str, Any]) -> None:
    rec["port_new"][1]["port_type"] = "1-hop"


def _escaping_image(rec: dict[str, Any]) -> None:
    rec["image"] = "../mmqake/train.json"


def _missing_image(rec: dict[str, Any]) -> None:
    rec["image"] = "m.0def34/google_9.jpg"


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (_no_final_triple, "field 'port_new[1].triple3' missing"),
        (_no_sub_answer, "field 'port_new[3].triple3.answer' missing"),
        (_no_paraphrases, "field 'port_new[0].triple2.rewrite_question' missing"),
        (_one_string_paraphrase, "field 'port_new[0].triple2.rewrite_question' must be a list, got a string"),
        (_empty_paraphrases, "field 'port_new[2].triple4.rewrite_question' is empty"),
        (_alias_not_a_list, "field 'port_new[1].triple3.answer_ali' must be a list, got a string"),
        (_five_hop, "port_new[3]: port_type must be '1-hop'..'4-hop', got '5-hop'"),
        (_two_chains_of_one_hop, "port_new[1]: a second '1-hop' chain"),
        (_escaping_image, "field 'image': image path '../mmqake/train.json' escapes the data root"),
        (_missing_image, "field 'image': image 'm.0def34/google_9.jpg' not found under "),
    ],
)
def test_a_bad_record_is_one_line_or_skipped(tmp_path: Path, spoil: Any, message: str) -> None:
    records = _records()
    spoil(records[2])
    path = _write(tmp_path, records)
    with pytest.raises(BadRecordError) as err:
        _load(path)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"{path}:4 (mmqake-00002): {message}")
    bench = _load(path, skip_bad=True)
    assert [c.case_id for c in bench.cases] == ["mmqake-00000"]
    (problem,) = bench.skipped  # the record without port_new is not a problem
    assert (problem.line, problem.case_id) == (4, "mmqake-00002")


def test_rephrased_setting_needs_image_rephrase(tmp_path: Path) -> None:
    records = _records()
    del records[0]["image_rephrase"]
    path = _write(tmp_path, records)
    assert len(_load(path).cases) == 2  # I-Gen is optional, as in VLKEB
    with pytest.raises(
        BadRecordError, match=r"mmqake\.json:2 \(mmqake-00000\): field 'image_rephrase' missing"
    ):
        _load(path, image="rephrased")


def test_an_empty_alt_is_left_out_like_the_loader_and_a_file_of_none_is_refused(tmp_path: Path) -> None:
    records = _records()
    records[0]["alt"] = ""
    bench = _load(_write(tmp_path, records))
    assert [c.case_id for c in bench.cases] == ["mmqake-00002"] and bench.skipped == ()
    with pytest.raises(BadRecordError, match="no records"):
        _load(_write(tmp_path, [records[0], records[1]]))


# ---------------------------------------------------------------- M-Acc and H-Acc on the fixture


def _score(right: bool) -> ItemScore:
    """A hand-made one-token teacher-forced score (as in test_metrics)."""
    argmax = torch.tensor([7 if right else 3])  # (1,) against the label 7
    return ItemScore(torch.tensor([7]), argmax, argmax[:, None], float(right), right, 0.5)


RIGHT, WRONG = _score(True), _score(False)


def _scored(case: EditCase, wrong: set[tuple[str, int, int]]) -> list[ProbeResult]:
    """Chain probes scored right unless (group, variant, position in that variant) is in ``wrong``."""
    results, seen = [], {}
    for p in case.probes:
        if p.group is None:
            continue
        at = seen[(p.group, p.variant)] = seen.get((p.group, p.variant), -1) + 1
        results.append(probe_result(p, WRONG if (p.group, p.variant, at) in wrong else RIGHT))
    return results


def test_m_acc_needs_any_paraphrase_and_h_acc_the_same_paraphrases_steps() -> None:
    city = _load().cases[0]
    # chain1: only paraphrase 1's final answer is right. chain2: paraphrase 0's final is right but
    # its triple2 step (position 2) is wrong; paraphrase 1's steps are right but its final is not.
    wrong = {("chain1", 0, 0), ("chain1", 2, 0), ("chain2", 0, 2), ("chain2", 1, 0), ("chain2", 2, 0)}
    values = case_values(_scored(city, wrong))
    assert (values["m_acc_hop1"], values["h_acc_hop1"]) == (1.0, 1.0)
    assert (values["m_acc_hop2"], values["h_acc_hop2"]) == (1.0, 0.0)
    assert (values["m_acc"], values["h_acc"]) == (1.0, 0.5)
    assert values["portability_hop1"] == pytest.approx(1 / 3)  # the plain mean counts each paraphrase
    fixed = case_values(_scored(city, wrong - {("chain2", 2, 0)}))  # paraphrase 2: all right
    assert fixed["h_acc_hop2"] == 1.0
    edit_missed = case_values(_scored(city, {(f"chain{h}", v, 1) for h in (1, 2) for v in range(3)}))
    assert (edit_missed["m_acc"], edit_missed["h_acc"]) == (1.0, 0.0)  # step 1 is the edit itself


def _generated(case: EditCase, answers: dict[str, str]) -> list[ProbeResult]:
    out = []
    for p in case.probes:
        if p.group is not None:
            said = answers.get(p.target, "no idea")
            out.append(probe_result(p, RIGHT if said == p.target else WRONG, generated=said))
    return out


def test_an_alias_counts_for_the_generated_measures_unless_aliases_are_off() -> None:
    answers = {"New York": "NY", "Albany": "Albany", "Kathy Hochul": "Kathleen Hochul"}
    with_aliases = _generated(_load().cases[0], answers)
    for measure in ("generated_match", "generated_vqa", "generated_f1"):
        values = case_values(with_aliases, measure)
        assert (values["m_acc"], values["h_acc"]) == (1.0, 1.0), measure
    assert case_values(with_aliases)["m_acc"] == 0.0  # teacher-forced: only the target's tokens count
    without = case_values(_generated(_load(aliases=False).cases[0], answers), "generated_vqa")
    assert (without["m_acc"], without["h_acc"]) == (0.0, 0.0)


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize("options", [[], ["image=rephrased", "aliases=false"]])
def test_validate_and_convert_round_trip(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, options: list[str]
) -> None:
    out = tmp_path / "cases.jsonl"
    assert main(["validate", "--format", "mmqake", str(EVAL), "--image-root", str(IMAGES), *options]) == 0
    assert "(2 cases)" in capsys.readouterr().out
    args = ["convert", "--from", "mmqake", str(EVAL), "--out", str(out), "--image-root", str(IMAGES)]
    assert main([*args, *options]) == 0
    parsed = dict(o.split("=") for o in options)
    reader_options = {k: (v if k == "image" else v == "true") for k, v in parsed.items()}
    foreign = load_benchmark(f"mmqake:{EVAL}", IMAGES, options=reader_options)
    native = load_benchmark(f"native:{out}")

    def same(c: EditCase) -> tuple[Any, ...]:
        return (c.edit, c.probes, c.edit_type, c.companions, c.task)

    assert [same(c) for c in native.cases] == [same(c) for c in foreign.cases]
    assert any(p.kind == K.HOP_STEP for p in native.cases[1].probes)


def test_run_ft_and_ike_with_generation_end_to_end(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = ["run", "--benchmark", f"mmqake:{EVAL}", "--image-root", str(IMAGES), "--model", "world"]
    args += ["methods=[ft,ike]", "evaluation=[teacher_forced,generation]", f"benchmark_options.train={TRAIN}"]
    assert main([*args, f"out={tmp_path / 'runs'}", "--run-id", "r"]) == 0
    run = tmp_path / "runs" / "r"
    summary = json.loads((run / "summary.json").read_text())
    groups = {g["method"]: g for g in summary["groups"] if g["edit_type"] == "all"}
    assert set(groups) == {"ft", "ike"}
    for group in groups.values():
        assert group["n_cases"] == 2 and group["n_error"] == 0
        for section in ("metrics", "generated", "generated_vqa", "generated_f1"):
            for key in ("m_acc", "h_acc", "m_acc_hop1", "h_acc_hop4"):
                assert 0.0 <= group[section][key] <= 1.0, (section, key)
    first = json.loads((run / "cases.jsonl").read_text().splitlines()[0])
    steps = [p for p in first["probes"] if p["kind"] == "hop_step"]
    assert {(p["group"], p["variant"]) for p in steps} >= {("chain1", 0), ("chain2", 2)}
