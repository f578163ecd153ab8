"""The CCKEB reader (MemEIC, NeurIPS 2025): a visual edit, its textual companion, and both together."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mmke.cli import main
from mmke.data.benchmark import Benchmark, load_benchmark
from mmke.errors import BadRecordError, ConfigError
from mmke.eval.protocols import Sequential, Single
from mmke.types import EditCase, EditFact, EditType, ImageRef, ProbeKind

FIX = Path(__file__).parent / "fixtures" / "formats"
IMAGES = FIX / "images"
EVAL = FIX / "cckeb" / "CCKEB_eval.json"
TRAIN = FIX / "cckeb" / "CCKEB_train.json"
K = ProbeKind
CCKEB_METRICS = (
    "compositional",
    "textual_edit_reliability",
    "textual_edit_generality",
    "textual_edit_locality",
)


def _load(file: Path = EVAL, skip_bad: bool = False, **options: Any) -> Benchmark:
    return load_benchmark(f"cckeb:{file}", IMAGES, skip_bad=skip_bad, options=options)


def _rows(case: EditCase) -> list[tuple[str, str, str, str | None]]:
    return [(p.kind.value, p.prompt, p.target, p.image.path if p.image else None) for p in case.probes]


# ---------------------------------------------------------------- field mapping


def test_first_record_maps_every_field_probe_by_probe() -> None:
    bench = _load()
    assert bench.name == "cckeb:CCKEB_eval" and bench.skipped == ()
    case = bench.cases[0]
    assert (case.case_id, case.edit_type, case.task) == ("CCKEB_eval-00000", EditType.VISUAL_ENTITY, None)
    img = "m.0abc12/google_3.jpg"
    assert case.edit == EditFact(
        "What is the name of this building?", "Elizabeth Tower", ImageRef(img), "Big Ben"
    )
    assert case.companions == (EditFact("Who designed Elizabeth Tower?", "Jane Doe", None, "Augustus Pugin"),)
    assert _rows(case) == [
        ("reliability", "What is the name of this building?", "Elizabeth Tower", img),
        ("text_generality", "Which building is shown?", "Elizabeth Tower", img),
        ("image_generality", "What is the name of this building?", "Elizabeth Tower", "m.0abc12/bing_7.jpg"),
        ("text_locality", "nq question: when did the berlin wall fall", "1989", None),
        ("image_locality", "What color is the bus?", "red", "val2014/COCO_val2014_000000000003.jpg"),
        ("textual_edit_reliability", "Who designed Elizabeth Tower?", "Jane Doe", None),
        ("textual_edit_generality", "Elizabeth Tower was designed by whom?", "Jane Doe", None),
        ("textual_edit_locality", "nq question: who wrote the iliad", "Homer", None),
        ("compositional", "Who designed the building in the image?", "Jane Doe", img),
    ]
    (comp,) = case.probes_of(K.COMPOSITIONAL)
    assert comp.aliases == () and comp.hop is None  # Q&A.Answer equals the target: no alias
    assert case.meta == {"source": "CCKEB_eval.json:2"}


def test_list_answers_are_joined_and_the_comp_target_is_the_textual_alt() -> None:
    case = _load().cases[1]
    assert case.companions[0].target == "Kelso Scotland"
    assert case.companions[0].ground_truth == "Jedburgh Scotland"
    assert [p.target for p in case.probes_of(K.TEXTUAL_EDIT_RELIABILITY)] == ["Kelso Scotland"]
    assert [p.target for p in case.probes_of(K.TEXTUAL_EDIT_GENERALITY)] == ["Kelso Scotland"]
    (comp,) = case.probes_of(K.COMPOSITIONAL)
    # MemEIC scores textual_edit.alt; the file's own Q&A.Answer stays an accepted answer
    assert (comp.target, comp.aliases, comp.image) == ("Kelso Scotland", ("Kelso",), case.edit.image)


def test_hop_entries_become_vlkeb_portability_and_comp_does_not() -> None:
    first, _, third = _load().cases
    assert first.probes_of(K.PORTABILITY) == ()
    (port,) = third.probes_of(K.PORTABILITY)
    assert (port.prompt, port.target, port.hop, port.image) == (
        "Which family of instruments does the instrument in the image belong to?",
        "the viol family",
        2,
        ImageRef("entity/e_001.jpg"),
    )
    assert [p.kind for p in third.probes[-2:]] == [K.COMPOSITIONAL, K.PORTABILITY]


def test_every_protocol_writes_the_visual_edit_then_the_textual_one() -> None:
    case = _load().cases[1]
    for protocol in (Single(), Sequential()):
        visual, textual = protocol.writes(case)
        assert visual is case
        assert (textual.case_id, textual.edit, textual.probes) == (
            "CCKEB_eval-00001/companion1",
            case.companions[0],
            (),
        )


def test_train_option_rephrase_root_and_unknown_options(tmp_path: Path) -> None:
    bench = _load(train=str(TRAIN))
    assert [c.companions[0].target for c in bench.train_cases] == ["120 metres", "eight comets"]
    recs = json.loads(EVAL.read_text())[:1]
    recs[0]["image_rephrase"] = "bing_7.jpg"  # under its own root, as EasyEdit's rephrase_image
    moved = _load(_write(tmp_path, recs), rephrase_image_root=str(IMAGES / "m.0abc12"))
    assert moved.cases[0].probes_of(K.IMAGE_GENERALITY)[0].image == ImageRef("m.0abc12/bing_7.jpg")
    with pytest.raises(ConfigError, match="did you mean 'train'"):
        _load(trian=str(TRAIN))
    with pytest.raises(ConfigError, match="no option 'hop'"):
        _load(hop=1)  # MemEIC's hop=1 is the comp entry, which this reader always reads


# ---------------------------------------------------------------- bad records


def _write(tmp_path: Path, records: list[Any], name: str = "CCKEB_eval.json") -> Path:
    """One record per line, so record i starts on line i + 2."""
    path = tmp_path / name
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    return path


def _te(**changes: Any) -> Callable[[dict[str, Any]], None]:
    def spoil(rec: dict[str, Any]) -> None:
        for key, value in changes.items():
            if value is None:
                del rec["textual_edit"][key]
            else:
                rec["textual_edit"][key] = value

    return spoil


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def spoil(rec: dict[str, Any]) -> None:
        if value is None:
            del rec[key]
        else:
            rec[key] = value

    return spoil


def _port(entries: list[Any]) -> Callable[[dict[str, Any]], None]:
    return _set("port_new", entries)


COMP_OK = {"port_type": "comp", "Q&A": {"Question": "Who?", "Answer": "x"}}


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (_set("textual_edit", None), "field 'textual_edit' missing"),
        (_set("textual_edit", "Kelso"), "field 'textual_edit' must be an object, got a string"),
        (_te(src=None), "field 'textual_edit.src' missing"),
        (_te(alt=None), "field 'textual_edit.alt' missing"),
        (_te(alt=["Kelso", 7.5, None]), "field 'textual_edit.alt[2]' must be a string, got null"),
        (_te(alt=[]), "field 'textual_edit.alt' is an empty list"),
        (_te(pred={"a": 1}), "field 'textual_edit.pred' must be a string, got an object"),
        (_te(rephrase="  "), "field 'textual_edit.rephrase' is empty"),
        (_te(loc_ans=None), "field 'textual_edit.loc_ans' missing"),
        (_set("alt", ""), "field 'alt' is empty"),
        (
            _set("image", "../cckeb/CCKEB_eval.json"),
            "field 'image': image path '../cckeb/CCKEB_eval.json' escapes",
        ),
        (_set("image", "m.0def34/missing.jpg"), "field 'image': image 'm.0def34/missing.jpg' not found"),
        (_port([]), "port_new has no 'comp' entry"),
        (_port([{"port_type": "1-hop", "Q&A": {"Question": "q", "Answer": "a"}}]), "no 'comp' entry"),
        (_port([{"port_type": "comp", "Q&A": "Who?"}]), "port_new[0]: 'Q&A' must be an object"),
        (_port([{"port_type": "comp", "Q&A": {"Answer": "x"}}]), "field 'port_new[0].Q&A.Question' missing"),
        (
            _port([{"port_type": "comp", "Q&A": {"Question": "q", "Answer": ["x"]}}]),
            "Q&A.Answer' must be a string",
        ),
        (
            _port([COMP_OK, {"port_type": "9-hop", "Q&A": {}}]),
            "port_new[1]: port_type must be '1-hop'..'4-hop'",
        ),
        (_port([COMP_OK, "2-hop"]), "port_new[1] must be an object"),
        (_set("port_new", {"port_type": "comp"}), "field 'port_new' must be a list, got an object"),
    ],
)
def test_a_bad_record_is_one_line_naming_file_line_and_case(
    tmp_path: Path, spoil: Callable[[dict[str, Any]], None], message: str
) -> None:
    records = json.loads(EVAL.read_text())
    spoil(records[1])
    path = _write(tmp_path, records)
    with pytest.raises(BadRecordError) as err:
        _load(path)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"{path}:3 (CCKEB_eval-00001): ") and message in text, text
    bench = _load(path, skip_bad=True)
    assert [c.case_id for c in bench.cases] == ["CCKEB_eval-00000", "CCKEB_eval-00002"]
    assert [(p.line, p.case_id) for p in bench.skipped] == [(3, "CCKEB_eval-00001")]


def test_a_bad_train_record_names_the_train_file(tmp_path: Path) -> None:
    records = json.loads(TRAIN.read_text())
    del records[0]["textual_edit"]["alt"]
    train = _write(tmp_path, records, "CCKEB_train.json")
    with pytest.raises(
        BadRecordError, match=r"CCKEB_train\.json:2 \(CCKEB_train-00000\): field 'textual_edit\.alt'"
    ):
        _load(train=str(train))


# ---------------------------------------------------------------- the command line


def test_validate_and_convert_to_native_give_the_same_cases(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "cases.jsonl"
    assert main(["validate", "--format", "cckeb", str(EVAL), "--image-root", str(IMAGES)]) == 0
    assert f"{EVAL}: ok (3 cases)" in capsys.readouterr().out
    args = ["convert", "--from", "cckeb", str(EVAL), "--out", str(out), "--image-root", str(IMAGES)]
    assert main(args) == 0
    foreign, native = _load(), load_benchmark(f"native:{out}")

    def key(c: EditCase) -> tuple:
        return (c.edit, c.probes, c.edit_type, c.companions, c.task)

    assert [key(c) for c in native.cases] == [key(c) for c in foreign.cases]
    assert all(c.companions for c in native.cases)


def _run(tmp_path: Path, *settings: str) -> dict[str, Any]:
    args = ["run", "--benchmark", f"cckeb:{EVAL}", "--image-root", str(IMAGES), "--model", "world"]
    assert main([*args, *settings, f"out={tmp_path}", "--run-id", "r"]) == 0
    return json.loads((tmp_path / "r" / "summary.json").read_text())


def _groups(summary: dict[str, Any]) -> dict[tuple[str, int | None], dict[str, Any]]:
    return {(g["method"], g["gap"]): g for g in summary["groups"] if g["edit_type"] == "all"}


def test_a_single_run_reports_the_cckeb_metrics_and_the_companion_is_written(tmp_path: Path) -> None:
    summary = _run(tmp_path, "methods=[ft_llm,grace,ike]", f"benchmark_options.train={TRAIN}")
    groups = _groups(summary)
    assert set(groups) == {("ft_llm", None), ("grace", None), ("ike", None)}
    for group in groups.values():
        assert group["n_cases"] == 3 and group["n_error"] == 0
        assert all(group["metrics"][m] is not None for m in CCKEB_METRICS)
        assert group["metrics"]["portability_hop2"] is not None
    base = groups["grace", None]["base"]
    # GRACE answers only the prompts it wrote: Txt-Rel is right only if the textual fact was written
    assert base["textual_edit_reliability"] == 0.0
    assert groups["grace", None]["metrics"]["textual_edit_reliability"] == 1.0
    # fine-tuning on both facts lets the model answer the question that needs them together
    assert groups["ft_llm", None]["metrics"]["compositional"] > base["compositional"]


def test_memeic_continual_protocol_scores_every_gap(tmp_path: Path) -> None:
    _run(tmp_path, "methods=[ft_llm]", "protocol=sequential", "gaps=[0,1]")
    records = [json.loads(x) for x in (tmp_path / "r" / "cases.jsonl").read_text().splitlines()]
    scored = sorted((r["run"]["gap"], r["case_id"], r["index"]) for r in records)
    assert scored == [
        (0, "CCKEB_eval-00000", 0),
        (0, "CCKEB_eval-00001", 1),
        (0, "CCKEB_eval-00002", 2),
        (1, "CCKEB_eval-00000", 1),  # scored after the next case's two edits
        (1, "CCKEB_eval-00001", 2),
    ]
    assert all(isinstance(r["metrics"]["compositional"], float) for r in records)
    assert all(r["metrics"]["compositional"] > r["base"]["compositional"] for r in records)
