"""The ``mmku`` reader: MMKU-Bench's test records, the scenario, one-line errors, and a scored run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mmke.cli import main
from mmke.data.benchmark import load_benchmark
from mmke.errors import BadRecordError, ConfigError
from mmke.types import EditFact, EditType, ImageRef, Probe, ProbeKind

FIX = Path(__file__).parent / "fixtures" / "formats"
IMAGES = FIX / "images"
UPDATED = FIX / "mmku" / "updated" / "updated_test_rewrite.jsonl"
UNKNOWN = FIX / "mmku" / "unknown" / "unknown_test_rewrite.jsonl"
TRAIN = FIX / "mmku" / "updated" / "train_in_test_shape.jsonl"


def good_record(**changes: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "question_id": "q-1",
        "image": "entity/e_001.jpg",
        "text": "Who now leads the club whose crest is shown?",
        "answer": "Marta Lindqvist",
        "type": "person",
        "cnn_wiki_type": "news",
    }
    rec.update(changes)
    return {k: v for k, v in rec.items() if v is not None}


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------- the fixture files


def test_updated_file_maps_every_field() -> None:
    bench = load_benchmark(f"mmku:{UPDATED}", IMAGES)
    assert bench.name == "mmku:updated_test_rewrite" and bench.version == "mmku-v1"
    assert bench.image_root == IMAGES.resolve() and not bench.skipped and not bench.train_cases
    assert [c.case_id for c in bench.cases] == [f"updated_test_rewrite-0000{i}" for i in range(3)]
    first = bench.cases[0]
    question = "Who is the current head coach of the football club whose crest is shown in the image?"
    image = ImageRef("entity/e_001.jpg")
    assert first.edit == EditFact(question, "Marta Lindqvist", image, ground_truth=None)
    assert first.probes == (Probe(ProbeKind.RELIABILITY, question, "Marta Lindqvist", image),)
    assert (first.edit_type, first.task, first.companions) == (EditType.VISUAL_ENTITY, "updated", ())
    assert first.meta == {
        "question_id": "updated_0001",
        "type": "person",
        "cnn_wiki_type": "news",
        "source": "updated_test_rewrite.jsonl:1",
    }
    year, moons = bench.cases[1:]
    assert (year.edit.target, year.probes[0].target) == ("2025", "2025")  # a numeric answer is text
    assert year.meta["cnn_wiki_type"] == "wiki" and year.meta["type"] == "time"
    assert moons.edit.image == moons.probes[0].image == ImageRef("visual/img_001.jpg")
    assert moons.probes[0].prompt == "How many moons of the planet in this image are now confirmed?"
    assert all(len(c.probes) == 1 and c.edit.ground_truth is None for c in bench.cases)


def test_unknown_file_is_the_unknown_scenario() -> None:
    bench = load_benchmark(f"mmku:{UNKNOWN}", IMAGES)
    assert {c.task for c in bench.cases} == {"unknown"}
    assert [c.meta["question_id"] for c in bench.cases] == ["101", "102", "103"]  # numeric ids as text
    festival = bench.cases[1]
    assert (festival.edit.prompt, festival.edit.target, festival.edit.image) == (
        "Which city hosts the festival depicted in this image?",
        "Tromsø",
        ImageRef("user/u_002.jpg"),
    )
    assert festival.probes == (
        Probe(ProbeKind.RELIABILITY, festival.edit.prompt, "Tromsø", ImageRef("user/u_002.jpg")),
    )
    award = bench.cases[2]
    assert (award.edit.target, award.meta["type"], award.meta["cnn_wiki_type"]) == (
        "the Golden Gear Prize",
        "event",
        "news",
    )


def test_paths_are_relative_to_the_image_root_as_in_mmkus_layout(tmp_path: Path) -> None:
    root = tmp_path / "MMKU-Bench"
    (root / "updated" / "images").mkdir(parents=True)
    (root / "updated" / "images" / "0001.jpg").write_bytes((IMAGES / "entity" / "e_001.jpg").read_bytes())
    file = write_jsonl(
        root / "updated" / "updated_test_rewrite.jsonl", [good_record(image="updated/images/0001.jpg")]
    )
    bench = load_benchmark(f"mmku:{file}", root)
    assert bench.cases[0].edit.image == ImageRef("updated/images/0001.jpg")
    assert bench.image_root == root.resolve()
    # without --image-root, paths are read from the file's folder
    msg = _error(f"mmku:{file}", None)
    assert "field 'image': image 'updated/images/0001.jpg'" in msg and "not found" in msg


def test_optional_meta_fields_may_be_absent(tmp_path: Path) -> None:
    file = write_jsonl(tmp_path / "updated.jsonl", [good_record(type=None, cnn_wiki_type=None)])
    case = load_benchmark(f"mmku:{file}", IMAGES).cases[0]
    assert case.meta == {"question_id": "q-1", "source": "updated.jsonl:1"}


# ---------------------------------------------------------------- the scenario


@pytest.mark.parametrize(
    ("relpath", "options", "task"),
    [
        ("any/updated_test_rewrite.jsonl", {}, "updated"),
        ("any/Unknown_test_rewrite.jsonl", {}, "unknown"),
        ("unknown/test.jsonl", {}, "unknown"),  # by folder when the name says nothing
        ("updated/test.jsonl", {}, "updated"),
        ("any/mine.jsonl", {"scenario": "unknown"}, "unknown"),
        ("updated/updated_test.jsonl", {"scenario": "unknown"}, "unknown"),  # the option wins
    ],
)
def test_the_scenario_comes_from_the_option_the_name_or_the_folder(
    tmp_path: Path, relpath: str, options: dict[str, str], task: str
) -> None:
    file = write_jsonl(tmp_path / relpath, [good_record()])
    assert load_benchmark(f"mmku:{file}", IMAGES, options=options).cases[0].task == task


@pytest.mark.parametrize(
    ("relpath", "options", "message"),
    [
        ("data/test.jsonl", {}, "cannot tell the MMKU-Bench scenario from the file's name or folder; set "),
        ("unknown/updated_test.jsonl", {}, "name says 'updated' but its folder says 'unknown'; set "),
        ("updated/test.jsonl", {"scenario": "new"}, "scenario='new': expected 'updated' or 'unknown'"),
        ("updated/test.jsonl", {"scenaro": "updated"}, "no option 'scenaro'.*did you mean 'scenario'"),
    ],
)
def test_an_unknown_scenario_asks_for_the_option(
    tmp_path: Path, relpath: str, options: dict[str, str], message: str
) -> None:
    file = write_jsonl(tmp_path / relpath, [good_record()])
    with pytest.raises(ConfigError, match=message) as err:
        load_benchmark(f"mmku:{file}", IMAGES, options=options)
    assert "\n" not in str(err.value)


def test_a_missing_file_or_no_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_benchmark(f"mmku:{FIX / 'mmku' / 'nope.jsonl'}", IMAGES)
    with pytest.raises(ConfigError, match="needs a file: mmku:MMKU-Bench/updated/"):
        load_benchmark("mmku", IMAGES)


# ---------------------------------------------------------------- bad records


def _error(spec: str, root: Path | None = IMAGES, **kw: Any) -> str:
    with pytest.raises(BadRecordError) as err:
        load_benchmark(spec, root, **kw)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"question_id": None}, "field 'question_id' missing"),
        ({"text": None}, "field 'text' missing"),
        ({"answer": None}, "field 'answer' missing"),
        ({"image": None}, "field 'image' missing"),
        ({"answer": "   "}, "field 'answer' is empty"),
        ({"text": ["a", "list"]}, "field 'text' must be a string, got a list"),
        ({"answer": {"en": "x"}}, "field 'answer' must be a string, got an object"),
        ({"type": ["person"]}, "field 'type' must be a string, got a list"),
        ({"question_id": True}, "field 'question_id' must be a string"),
        ({"image": "../images/entity/e_001.jpg"}, "escapes the data root"),
        ({"image": "/etc/passwd"}, "is absolute"),
        ({"image": "entity/missing.jpg"}, "field 'image': image 'entity/missing.jpg'"),
        ({"question_id": "q-0"}, "field 'question_id': 'q-0' is already the id of case updated-00000"),
    ],
)
def test_a_bad_record_is_one_line_naming_file_line_and_case(
    tmp_path: Path, changes: dict[str, Any], problem: str
) -> None:
    other = good_record(question_id="q-0", text="Which city is shown?", answer="Oslo")
    file = write_jsonl(tmp_path / "updated.jsonl", [other, good_record(**changes)])
    msg = _error(f"mmku:{file}")
    assert msg.startswith(f"{file}:2 (updated-00001): ") and problem in msg, msg


def test_a_record_that_is_not_an_object_and_a_duplicate(tmp_path: Path) -> None:
    file = write_jsonl(tmp_path / "updated.jsonl", [good_record(), "just a string"])
    assert "(updated-00001): record must be a JSON object, got a string" in _error(f"mmku:{file}")
    twice = write_jsonl(tmp_path / "updated2.jsonl", [good_record(), good_record(question_id="q-2")])
    assert "updated2.jsonl:2 (updated2-00001): duplicate of the record on line 1" in _error(f"mmku:{twice}")


def test_skip_bad_keeps_the_good_records_and_lists_the_bad(tmp_path: Path) -> None:
    records = [
        good_record(),
        good_record(question_id="q-2", answer=None),
        good_record(question_id="q-3", text="Which city is shown?", image="visual/img_002.jpg"),
        good_record(question_id="q-1", text="Another question?"),  # repeats q-1
    ]
    file = write_jsonl(tmp_path / "updated.jsonl", records)
    assert "updated.jsonl:2 (updated-00001): field 'answer' missing (and 1 more)" in _error(f"mmku:{file}")
    bench = load_benchmark(f"mmku:{file}", IMAGES, skip_bad=True)
    assert [c.meta["question_id"] for c in bench.cases] == ["q-1", "q-3"]
    assert [(p.line, p.case_id) for p in bench.skipped] == [(2, "updated-00001"), (4, "updated-00003")]
    assert "is already the id of case updated-00000" in bench.skipped[1].message


# ---------------------------------------------------------------- the train option


def test_train_takes_records_in_the_test_shape() -> None:
    bench = load_benchmark(f"mmku:{UPDATED}", IMAGES, options={"train": str(TRAIN)})
    assert [c.case_id for c in bench.train_cases] == [f"train_in_test_shape-0000{i}" for i in range(3)]
    first = bench.train_cases[0]
    assert first.edit == EditFact(
        "What is the building in the image called now?", "Elizabeth Tower", ImageRef("m.0abc12/google_3.jpg")
    )
    assert first.task == "updated" and first.meta["question_id"] == "updated_train_0001"


def test_a_train_file_in_another_shape_is_refused_with_the_reason(tmp_path: Path) -> None:
    # the shape of ms-swift's SFT input, one guess at MMKU's unpublished train files
    swift = {"messages": [{"role": "user", "content": "<image>Who?"}], "images": ["entity/e_001.jpg"]}
    train = tmp_path / "updated_train_rewrite.json"
    train.write_text(json.dumps([swift, swift]))
    with pytest.raises(
        ConfigError, match=r"train=.*no record has the test-record shape .*'question_id' missing"
    ):
        load_benchmark(f"mmku:{UPDATED}", IMAGES, options={"train": str(train)})
    mixed = write_jsonl(tmp_path / "t.jsonl", [good_record(), swift])
    bench = load_benchmark(f"mmku:{UPDATED}", IMAGES, skip_bad=True, options={"train": str(mixed)})
    assert len(bench.train_cases) == 1 and [p.case_id for p in bench.skipped] == ["t-00001"]


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize("src", [UPDATED, UNKNOWN])
def test_validate_and_convert_round_trip_to_native(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, src: Path
) -> None:
    out = tmp_path / "cases.jsonl"
    assert main(["validate", "--format", "mmku", str(src), "--image-root", str(IMAGES)]) == 0
    assert main(["convert", "--from", "mmku", str(src), "--out", str(out), "--image-root", str(IMAGES)]) == 0
    assert "wrote 3 cases" in capsys.readouterr().out
    foreign, native = load_benchmark(f"mmku:{src}", IMAGES), load_benchmark(f"native:{out}")
    assert [(c.edit, c.probes, c.edit_type, c.companions, c.task, c.meta) for c in native.cases] == [
        (c.edit, c.probes, c.edit_type, c.companions, c.task, c.meta) for c in foreign.cases
    ]


def test_validate_lists_every_bad_record(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    file = write_jsonl(
        tmp_path / "updated.jsonl", [good_record(text=None), good_record(image="/abs.jpg"), good_record()]
    )
    assert main(["validate", "--format", "mmku", str(file), "--image-root", str(IMAGES)]) == 1
    out = capsys.readouterr().out.replace("\n", " ")
    assert f"{file}:1 (updated-00000): field 'text' missing" in out
    assert "(updated-00001)" in out and "2 problem(s)" in out and "1 good case(s)" in out


def test_run_scores_generation_as_mmku_does(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args = ["run", "--benchmark", f"mmku:{UPDATED}", "--image-root", str(IMAGES), "--model", "world"]
    args += ["methods=[ft,ike]", "evaluation=[teacher_forced,generation]", "max_new_tokens=64"]
    args += [f"benchmark_options.train={TRAIN}", f"out={tmp_path / 'runs'}", "--run-id", "r"]
    assert main(args) == 0
    assert "Rel VQA-Acc" in capsys.readouterr().out  # the CLI prints MMKU-Bench's measures
    run = tmp_path / "runs" / "r"
    summary = json.loads((run / "summary.json").read_text())
    for method in ("ft", "ike"):
        groups = [g for g in summary["groups"] if g["method"] == method]
        by_task = [g for g in groups if g.get("task") == "updated"]
        overall = [g for g in groups if g["edit_type"] == "all" and g.get("task") is None]
        assert len(by_task) == 1 and len(overall) == 1, groups
        for group in (*by_task, *overall):
            assert group["n_cases"] == 3
            for section in ("generated_vqa", "generated_f1"):
                assert 0.0 <= group[section]["reliability"] <= 1.0, (method, section, group)
    records = [json.loads(x) for x in (run / "cases.jsonl").read_text().splitlines()]
    assert {r["task"] for r in records} == {"updated"}
    assert all(set(r["generated_vqa"]) == set(r["generated_f1"]) == {"reliability"} for r in records)
    probe = records[0]["probes"][0]
    assert isinstance(probe["generated"], str) and probe["generated_vqa"] in (0.0, 1.0)
