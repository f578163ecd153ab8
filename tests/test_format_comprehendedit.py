"""The ``comprehendedit`` reader: own probes, KGI/KPI neighbours from two pools, options, one-line errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from mmke.cli import main
from mmke.data.benchmark import load_benchmark
from mmke.errors import BadRecordError, ConfigError
from mmke.types import EditType, ImageRef, ProbeKind

FIX = Path(__file__).parent / "fixtures" / "formats"
DIR = FIX / "comprehendedit"
TEST, ORI, TRAIN = (
    DIR / "ComprehendEdit_test.json",
    DIR / "ComprehendEdit_ori_right.json",
    DIR / "ComprehendEdit_train.json",
)
IMAGES = FIX / "images"
K = ProbeKind
VSR = "Question: Is this description true or false? Description: {} Short answer:"
GROUPS = ("img_topk", "txt_topk", "img_last_topk", "txt_last_topk")

#: The fixture's questions by position, in the test file and in ori_right.
QUESTIONS = [
    "What is this bird called?",
    "How many zebras are there?",
    "The cat is on top of the laptop.",
    "What kind of vehicle is on the road?",
]
ORI_QUESTIONS = [
    "What brand is the drink?",
    "What is the value of x in the figure?",
    "Is the sky blue?",
    "How many people are in the photo?",
    "The dog is next to the bench.",
]


def load(file: Path = TEST, skip_bad: bool = False, **options: Any) -> Any:
    return load_benchmark(f"comprehendedit:{file}", IMAGES, skip_bad=skip_bad, options=options)


def records(file: Path = TEST) -> list[dict[str, Any]]:
    return json.loads(file.read_text())


def write(path: Path, recs: list[Any]) -> Path:
    """One record per line (record i on line i + 2), like the fixture."""
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in recs) + "\n]\n")
    return path


def neighbours(case: Any, kind: ProbeKind, group: str) -> list[str]:
    return [p.prompt for p in case.probes_of(kind) if p.group == group]


# ---------------------------------------------------------------- field mapping


def test_edit_task_meta_and_own_probes() -> None:
    bench = load()
    assert bench.name == "comprehendedit:ComprehendEdit_test" and bench.version == "comprehendedit-v1"
    assert [c.case_id for c in bench.cases] == [f"ComprehendEdit_test-0000{i}" for i in range(4)]
    first = bench.cases[0]
    image = ImageRef("comprehendedit/GQA/images/2405722.jpg")
    assert first.edit_type == EditType.VISUAL_SEMANTIC
    assert (first.edit.prompt, first.edit.target, first.edit.image, first.edit.ground_truth) == (
        "What is this bird called?",
        "parrot",
        image,
        None,
    )
    assert first.task == "object recognition"
    assert first.meta == {"source_dataset": "GQA", "pid": "0", "source": "ComprehendEdit_test.json:2"}
    rel, tgen, tloc, iloc = first.probes[:4]
    assert (rel.kind, rel.prompt, rel.target, rel.image) == (
        K.RELIABILITY,
        first.edit.prompt,
        "parrot",
        image,
    )
    assert (tgen.kind, tgen.prompt, tgen.target, tgen.image) == (
        K.TEXT_GENERALITY,
        "What is the bird's name?",
        "parrot",
        image,
    )
    # the record's answer, not the prompt the authors' loader puts there
    assert (tloc.kind, tloc.prompt, tloc.target, tloc.image) == (
        K.TEXT_LOCALITY,
        "when does twice upon a time come out",
        "December 2017",
        None,
    )
    assert (iloc.kind, iloc.prompt, iloc.target, iloc.image) == (
        K.IMAGE_LOCALITY,
        "What sport can you use this for?",
        "surfing",
        ImageRef("val2014/COCO_val2014_000000000002.jpg"),
    )
    assert not first.probes_of(K.IMAGE_GENERALITY)  # no rephrased image in ComprehendEdit
    assert all(p.group is None for p in first.probes[:4])
    assert [c.task for c in bench.cases] == [
        "object recognition",
        "object counting",
        "spatial relationship",
        "object recognition",
    ]
    assert bench.cases[1].edit.target == "3"  # TallyQA's numeric answer read as text


def test_kgi_takes_the_first_k_and_the_last_k_of_the_far_lists() -> None:
    case = load().cases[0]
    # record 0: img_topk [3,1,2,3,1], txt_topk [3,2,1,2,3], img_last [1,3,2,1,2], txt_last [2,1,3,1,2]
    expected = {
        "img_topk": [3, 1, 2, 3],
        "txt_topk": [3, 2, 1, 2],
        "img_last_topk": [3, 2, 1, 2],
        "txt_last_topk": [1, 3, 1, 2],
    }
    for group, idx in expected.items():
        assert neighbours(case, K.IN_DOMAIN_GENERALITY, group) == [QUESTIONS[i] for i in idx], group
    kgi = case.probes_of(K.IN_DOMAIN_GENERALITY)
    assert [p.group for p in kgi] == [g for g in GROUPS for _ in range(4)]
    counting = kgi[1]  # record 1: its own answer and image
    assert (counting.target, counting.image) == ("3", ImageRef("comprehendedit/TallyQA/VG_100K/2339451.jpg"))


def test_kpi_neighbours_come_from_ori_right_with_their_own_answers() -> None:
    case = load().cases[0]
    expected = {
        "img_topk": [0, 1, 2, 3],
        "txt_topk": [4, 3, 2, 1],
        "img_last_topk": [2, 3, 4, 0],
        "txt_last_topk": [0, 4, 1, 3],
    }
    for group, idx in expected.items():
        assert neighbours(case, K.IN_DOMAIN_LOCALITY, group) == [ORI_QUESTIONS[i] for i in idx], group
    brand = case.probes_of(K.IN_DOMAIN_LOCALITY)[0]
    assert (brand.target, brand.image, brand.group) == (
        "coca cola",
        ImageRef("comprehendedit/TextVQA/train_images/0a1b2c3d4e5f6a7b.jpg"),
        "img_topk",
    )
    assert len(case.probes) == 4 + 16 + 16
    kinds = [p.kind for p in case.probes]
    assert kinds == [
        K.RELIABILITY,
        K.TEXT_GENERALITY,
        K.TEXT_LOCALITY,
        K.IMAGE_LOCALITY,
        *[K.IN_DOMAIN_GENERALITY] * 16,
        *[K.IN_DOMAIN_LOCALITY] * 16,
    ]


def test_k_option_chooses_how_many_neighbours() -> None:
    one = load(k=1).cases[0]
    assert [(p.group, p.prompt) for p in one.probes_of(K.IN_DOMAIN_GENERALITY)] == [
        ("img_topk", QUESTIONS[3]),
        ("txt_topk", QUESTIONS[3]),
        ("img_last_topk", QUESTIONS[2]),  # the last of [1,3,2,1,2]
        ("txt_last_topk", QUESTIONS[2]),
    ]
    assert neighbours(one, K.IN_DOMAIN_LOCALITY, "img_last_topk") == [ORI_QUESTIONS[0]]
    five = load(k=5).cases[0]
    assert neighbours(five, K.IN_DOMAIN_GENERALITY, "img_last_topk") == [
        QUESTIONS[i] for i in (1, 3, 2, 1, 2)
    ]
    assert len(five.probes) == 4 + 20 + 20
    for bad in (0, 6, True, "4", 2.5):
        with pytest.raises(ConfigError, match=r"benchmark option k=.*expected an integer 1-5"):
            load(k=bad)


def test_source_templates_frame_every_question_but_text_locality() -> None:
    plain, framed = load().cases[1], load(source_templates=True).cases[1]
    tally = "Question: {} Answer with a number. Short answer:"
    assert framed.edit.prompt == tally.format("How many zebras are there?")
    assert framed.probes[0].prompt == framed.edit.prompt
    assert framed.probes[1].prompt == tally.format("What is the number of zebras in the picture?")
    assert (
        framed.probes[2].prompt == plain.probes[2].prompt == "who sang the song i want to know what love is"
    )
    assert (
        framed.probes[3].prompt == "Question: What are these birds sitting on? Short answer:"
    )  # M-Loc: gqa's
    # each neighbour is framed by its own source: record 1's img_topk starts with 0 (GQA), 3 (GQA), 2 (VSR)
    assert neighbours(framed, K.IN_DOMAIN_GENERALITY, "img_topk")[:3] == [
        "Question: What is this bird called? Short answer:",
        "Question: What kind of vehicle is on the road? Short answer:",
        VSR.format("The cat is on top of the laptop."),
    ]
    # record 1's ori_rt_img_topk starts with 3 (TallyQA), 4 (VSR), 0 (TextVQA), 1 (MathVista)
    assert neighbours(framed, K.IN_DOMAIN_LOCALITY, "img_topk") == [
        tally.format("How many people are in the photo?"),
        VSR.format("The dog is next to the bench."),
        "Question: What brand is the drink? Short answer:",
        "What is the value of x in the figure? Short answer:",
    ]
    assert [p.target for p in framed.probes] == [p.target for p in plain.probes]
    with pytest.raises(ConfigError, match="source_templates='yes': expected true or false"):
        load(source_templates="yes")


def test_a_single_line_file_reads_the_same(tmp_path: Path) -> None:
    one_line = tmp_path / "ComprehendEdit_test.json"
    one_line.write_text(json.dumps(records()))  # the real files: the whole list on line 1
    bench = load(one_line, ori_right=str(ORI))
    assert [(c.edit, c.probes, c.task) for c in bench.cases] == [
        (c.edit, c.probes, c.task) for c in load().cases
    ]
    assert {c.meta["source"] for c in bench.cases} == {"ComprehendEdit_test.json:1"}


def test_train_split_has_no_neighbour_probes() -> None:
    bench = load(train=str(TRAIN))
    assert [c.case_id for c in bench.train_cases] == [
        "ComprehendEdit_train-00000",
        "ComprehendEdit_train-00001",
    ]
    first = bench.train_cases[0]
    assert [p.kind for p in first.probes] == [
        K.RELIABILITY,
        K.TEXT_GENERALITY,
        K.TEXT_LOCALITY,
        K.IMAGE_LOCALITY,
    ]
    assert (first.edit.prompt, first.edit.target, first.task) == (
        "Is there a traffic light in the picture?",
        "no",
        "object existence",
    )


# ---------------------------------------------------------------- the KPI pool


def test_without_an_ori_right_file_there_are_no_kpi_probes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    alone = write(tmp_path / "ComprehendEdit_test.json", records())
    with caplog.at_level(logging.WARNING, logger="mmke.data.formats.comprehendedit"):
        bench = load(alone)
    assert "no ComprehendEdit_ori_right.json beside" in caplog.text
    assert all(not c.probes_of(K.IN_DOMAIN_LOCALITY) for c in bench.cases)
    assert len(bench.cases[0].probes_of(K.IN_DOMAIN_GENERALITY)) == 16
    # named explicitly, from anywhere
    assert len(load(alone, ori_right=str(ORI)).cases[0].probes_of(K.IN_DOMAIN_LOCALITY)) == 16
    with pytest.raises(ConfigError, match=r"benchmark option ori_right: file .*nope.json not found"):
        load(alone, ori_right=str(tmp_path / "nope.json"))


def test_unknown_options_and_a_missing_file_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"no option 'ori_rigth'.*did you mean 'ori_right'"):
        load(ori_rigth=str(ORI))
    with pytest.raises(ConfigError, match="needs a file: comprehendedit:"):
        load_benchmark("comprehendedit", IMAGES)


# ---------------------------------------------------------------- bad input


def _with_extra(tmp_path: Path, **changes: Any) -> Path:
    """The fixture plus record 4 (line 6): record 0 changed; no neighbour list points at it."""
    extra = {**records()[0], "question": "Which bird is it?", **changes}
    return write(
        tmp_path / "ComprehendEdit_test.json", [*records(), {k: v for k, v in extra.items() if v is not None}]
    )


def _error(file: Path, **options: Any) -> str:
    with pytest.raises(BadRecordError) as e:
        load(file, **{"ori_right": str(ORI), **options})
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"question": None}, "field 'question' missing"),
        ({"answer": ["parrot"]}, "field 'answer' must be a string, got a list"),
        ({"answer": "  "}, "field 'answer' is empty"),
        ({"rephrase": {"q": 1}}, "field 'rephrase' must be a string, got an object"),
        ({"image": "../comprehendedit/GQA/images/2405722.jpg"}, "escapes the data root"),
        ({"image": "comprehendedit/GQA/images/missing.jpg"}, "not found"),
        ({"multimodal_locality_image": "/etc/passwd"}, "field 'multimodal_locality_image'"),
        ({"locality_ground_truth": None}, "field 'locality_ground_truth' missing"),
        ({"Category": ["object recognition"]}, "field 'Category' must be a string, got a list"),
        ({"pid": {"n": 4}}, "field 'pid' must be a string, got an object"),
        ({"img_topk": 3}, "field 'img_topk' must be a list, got a number"),
        ({"txt_topk": [1, "2", 3]}, "field 'txt_topk': item 1 must be an integer index, got a string"),
        ({"img_topk": [1, 2.0]}, "field 'img_topk': item 1 must be an integer index, got a number"),
        ({"txt_last_topk": [True]}, "field 'txt_last_topk': item 0 must be an integer index, got a boolean"),
        (
            {"img_last_topk": [0, 0, 0, 0, 9]},
            "field 'img_last_topk': index 9 is out of range (ComprehendEdit_test.json has 5 records)",
        ),
        ({"img_topk": [-1]}, "field 'img_topk': index -1 is out of range"),
        (
            {"ori_rt_txt_topk": [5]},
            "field 'ori_rt_txt_topk': index 5 is out of range (ComprehendEdit_ori_right.json has 5 records)",
        ),
    ],
)
def test_a_bad_record_is_one_line_naming_file_line_and_case(
    tmp_path: Path, changes: dict[str, Any], problem: str
) -> None:
    file = _with_extra(tmp_path, **changes)
    msg = _error(file)
    assert msg.startswith(f"{file}:6 (ComprehendEdit_test-00004): "), msg
    assert problem in msg, msg


def test_a_neighbour_that_cannot_be_read_fails_the_records_that_use_it(tmp_path: Path) -> None:
    recs = records()
    broken = {**recs[0], "question": "Which bird is it?", "answer": None}  # record 4: no answer
    user = {**recs[3], "question": "Which bus is it?", "img_last_topk": [4, 0, 0, 0, 0]}  # record 5
    file = write(tmp_path / "ComprehendEdit_test.json", [*recs, broken, user])
    # only the k used are read: with k=4 the last 4 of [4,0,0,0,0] never reach record 4
    bench = load(file, ori_right=str(ORI), skip_bad=True)
    assert [p.case_id for p in bench.skipped] == ["ComprehendEdit_test-00004"]
    assert bench.cases[-1].case_id == "ComprehendEdit_test-00005"
    bench = load(file, ori_right=str(ORI), skip_bad=True, k=5)
    assert [p.case_id for p in bench.skipped] == ["ComprehendEdit_test-00004", "ComprehendEdit_test-00005"]
    assert bench.skipped[1].message == (
        "field 'img_last_topk': index 4 points at an unreadable record of ComprehendEdit_test.json "
        "(field 'answer' missing)"
    )


def test_a_kpi_neighbour_image_must_pass_the_image_checks(tmp_path: Path) -> None:
    ori = records(ORI)
    ori[2]["image"] = "comprehendedit/GQA/images/gone.jpg"
    pool = write(tmp_path / "ori.json", ori)
    msg = _error(TEST, ori_right=str(pool))
    # record 0's ori_rt_img_topk [0,1,2,3,4] reaches index 2 first
    assert msg.startswith(f"{TEST}:2 (ComprehendEdit_test-00000): field 'ori_rt_img_topk': index 2 points at")
    assert "field 'image': image 'comprehendedit/GQA/images/gone.jpg'" in msg and "not found" in msg


def test_an_unknown_source_is_refused_only_with_templates(tmp_path: Path) -> None:
    file = _with_extra(tmp_path, source="OKVQA")
    assert len(load(file, ori_right=str(ORI)).cases) == 5
    msg = _error(file, source_templates=True)
    assert (
        "(ComprehendEdit_test-00004): field 'source' is 'OKVQA'; source_templates knows gqa, tallyqa" in msg
    )


def test_empty_answers_are_left_out_as_the_authors_loader_does(tmp_path: Path) -> None:
    file = _with_extra(tmp_path, answer="")
    bench = load(file, ori_right=str(ORI))
    assert len(bench.cases) == 4 and not bench.skipped
    # ... but a neighbour list may not point at one
    user = {**records()[3], "question": "Which bus is it?", "img_topk": [4]}
    pointing = write(tmp_path / "ComprehendEdit_test.json", [*records(file)[:5], user])
    assert "(field 'answer' is empty)" in _error(pointing)


def test_skip_bad_keeps_the_good_and_lists_the_bad(tmp_path: Path) -> None:
    file = _with_extra(tmp_path, image="comprehendedit/nope.jpg")
    with pytest.raises(BadRecordError, match=r"skip_bad=true skips them"):
        load(file, ori_right=str(ORI))
    bench = load(file, skip_bad=True, ori_right=str(ORI))
    assert [c.case_id for c in bench.cases] == [f"ComprehendEdit_test-0000{i}" for i in range(4)]
    assert [(p.case_id, p.line) for p in bench.skipped] == [("ComprehendEdit_test-00004", 6)]


# ---------------------------------------------------------------- the command line


def test_validate_and_convert_round_trip(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "cases.jsonl"
    assert main(["validate", "--format", "comprehendedit", str(TEST), "--image-root", str(IMAGES)]) == 0
    bad = _with_extra(tmp_path, txt_topk=[7])
    assert main(["validate", "--format", "comprehendedit", str(bad), "--image-root", str(IMAGES)]) == 1
    assert "(ComprehendEdit_test-00004): field 'txt_topk': index 7 is out of range" in capsys.readouterr().out
    args = ["convert", "--from", "comprehendedit", str(TEST), "--out", str(out), "--image-root", str(IMAGES)]
    assert main([*args, "k=2", "source_templates=true"]) == 0
    foreign, native = load(k=2, source_templates=True), load_benchmark(f"native:{out}")

    def shape(bench: Any) -> list[tuple]:
        return [(c.edit, c.probes, c.edit_type, c.companions, c.task) for c in bench.cases]

    assert shape(native) == shape(foreign)
    assert len(native.cases[0].probes_of(K.IN_DOMAIN_LOCALITY)) == 8
    assert {p.group for p in native.cases[0].probes_of(K.IN_DOMAIN_GENERALITY)} == set(GROUPS)


def test_run_ft_and_ike_end_to_end(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args = ["run", "--benchmark", f"comprehendedit:{TEST}", "--image-root", str(IMAGES), "--model", "world"]
    args += ["methods=[ft,ike]", f"benchmark_options.train={TRAIN}", "benchmark_options.k=2"]
    assert main([*args, f"out={tmp_path / 'runs'}", "--run-id", "r"]) == 0
    summary = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    groups = summary["groups"]
    for method in ("ft", "ike"):
        [overall] = [
            g for g in groups if g["method"] == method and g["edit_type"] == "all" and not g.get("task")
        ]
        assert overall["n_cases"] == 4
        metrics = overall["metrics"]
        for name in ("reliability", "text_generality", "in_domain_generality", "in_domain_locality"):
            assert metrics[name] is not None, (method, name)
        assert {f"kgi_{g}" for g in GROUPS} | {f"kpi_{g}" for g in GROUPS} <= set(metrics)
        assert "image_generality" not in metrics
        by_task = {g["task"]: g["n_cases"] for g in groups if g["method"] == method and g.get("task")}
        assert by_task == {"object recognition": 2, "object counting": 1, "spatial relationship": 1}
