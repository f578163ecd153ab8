"""Foreign benchmark files (MMEdit, VLKEB) load into the right cases, and hostile input fails cleanly.

Every bad file gives one line naming file:line (case id) and the problem, or (skip_bad) a
listed skip — never a traceback, never a hang.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from mmke.cli import main
from mmke.data.benchmark import load_benchmark
from mmke.data.checks import MAX_FIELD_CHARS
from mmke.data.formats._foreign import iter_records
from mmke.errors import BadRecordError, ConfigError
from mmke.types import EditType, ProbeKind

FIX = Path(__file__).parent / "fixtures" / "formats"
IMAGES = FIX / "images"
K = ProbeKind


def _kinds(case) -> list[str]:
    return [p.kind.value for p in case.probes]


# ---------------------------------------------------------------- the readers


def test_mmedit_vqa_maps_every_field() -> None:
    bench = load_benchmark(f"mmedit:{FIX / 'mmedit/vqa_eval.json'}", IMAGES)
    assert [c.case_id for c in bench.cases] == ["vqa_eval-00000", "vqa_eval-00001"]
    first = bench.cases[0]
    assert first.edit_type == EditType.VISUAL_SEMANTIC
    assert (first.edit.prompt, first.edit.target, first.edit.ground_truth) == (
        "What is the red food?",
        "tomatoes",
        "apples",
    )
    assert _kinds(first) == [
        "reliability",
        "text_generality",
        "image_generality",
        "text_locality",
        "image_locality",
    ]
    igen, tloc, iloc = first.probes_of(K.IMAGE_GENERALITY)[0], *first.probes[3:]
    assert igen.image.path == "val2014_image_rephrase/1_COCO_val2014_000000000001.png"
    assert (tloc.prompt, tloc.target, tloc.image) == ("nq question: who wrote the iliad", "Homer", None)
    assert (iloc.prompt, iloc.target, iloc.image.path) == (
        "What sport is this?",
        "surfing",
        "val2014/COCO_val2014_000000000002.jpg",
    )
    assert bench.cases[1].edit.target == "5"  # numeric answers are read as text
    assert "🚌" in bench.cases[1].probes_of(K.IMAGE_LOCALITY)[0].prompt
    assert first.meta["source"] == "vqa_eval.json:2"


def test_mmedit_caption_file_and_a_separate_rephrase_root(tmp_path: Path) -> None:
    bench = load_benchmark(f"mmedit:{FIX / 'mmedit/caption_eval_edit.json'}", IMAGES)
    assert bench.cases[0].edit.prompt == "a photo of"
    # rephrase images under their own root: refs are relative to the common folder
    options = {"rephrase_image_root": str(IMAGES / "val2014_image_rephrase")}
    rec = json.loads((FIX / "mmedit/caption_eval_edit.json").read_text())
    rec[0]["image_rephrase"] = "1_COCO_val2014_000000000001.png"
    rec[0]["image"], rec[0]["m_loc"] = "COCO_val2014_000000000002.jpg", "COCO_val2014_000000000003.jpg"
    f = tmp_path / "caption.json"
    f.write_text(json.dumps(rec))
    moved = load_benchmark(f"mmedit:{f}", IMAGES / "val2014", options=options)
    assert moved.image_root == IMAGES.resolve()
    assert moved.cases[0].probes_of(K.IMAGE_GENERALITY)[0].image.path == (
        "val2014_image_rephrase/1_COCO_val2014_000000000001.png"
    )
    assert moved.cases[0].edit.image.path == "val2014/COCO_val2014_000000000002.jpg"


def test_vlkeb_multihop_reads_every_hop_and_the_hop_filter_keeps_the_first_match() -> None:
    spec = f"vlkeb:{FIX / 'vlkeb/eval_multihop.json'}"
    bench = load_benchmark(spec, IMAGES)
    ports = [[(p.hop, p.target) for p in c.probes_of(K.PORTABILITY)] for c in bench.cases]
    assert ports == [[(1, "London"), (2, "Thames")], [(3, "pound sterling")]]
    assert all(p.image == c.edit.image for c in bench.cases for p in c.probes_of(K.PORTABILITY))
    assert bench.cases[0].edit_type == EditType.VISUAL_ENTITY
    # the paper's loader: hop=2 keeps only records with a 2-hop entry, and only that entry
    two = load_benchmark(spec, IMAGES, options={"hop": 2})
    assert [c.case_id for c in two.cases] == ["eval_multihop-00000"]
    assert [(p.hop, p.target) for p in two.cases[0].probes_of(K.PORTABILITY)] == [(2, "Thames")]
    assert not two.skipped  # filtered records are not bad records
    with pytest.raises(ConfigError, match="hop=7"):
        load_benchmark(spec, IMAGES, options={"hop": 7})
    with pytest.raises(ConfigError, match=r"no option 'hops'.*did you mean 'hop'"):
        load_benchmark(spec, IMAGES, options={"hops": 2})


def test_vlkeb_edit_onehop_carries_the_second_fact_and_a_train_split() -> None:
    options = {"train": str(FIX / "vlkeb/train.json")}
    bench = load_benchmark(f"vlkeb:{FIX / 'vlkeb/eval_edit_onehop.json'}", IMAGES, options=options)
    port = bench.cases[0].probes_of(K.PORTABILITY)[0]
    assert (port.prompt, port.target, port.hop) == ("Who designed the building in the image?", "Jane Doe", 2)
    assert port.onehop_edit is not None and port.onehop_edit.image is None  # text-only, as in VLKEB
    assert (port.onehop_edit.prompt, port.onehop_edit.target) == (
        "Elizabeth Tower was designed by",
        "Jane Doe",
    )
    assert len(bench.train_cases) == 2
    twice = load_benchmark(
        f"vlkeb:{FIX / 'vlkeb/eval_edit_onehop.json'}", IMAGES, options={"edit_twice_img": True}
    )
    assert twice.cases[0].probes_of(K.PORTABILITY)[0].onehop_edit.image == twice.cases[0].edit.image


def test_json_list_records_know_their_lines_and_jsonl_works_too(tmp_path: Path) -> None:
    f = tmp_path / "a.json"
    f.write_text('[\n  {"a": 1},\n\n  {"b": 2}\n]\n')
    assert [(r.index, r.line) for r in iter_records(f)] == [(0, 2), (1, 4)]
    g = tmp_path / "a.jsonl"
    g.write_text('{"a": 1}\n\n{"b": 2}\n')
    assert [(r.index, r.line) for r in iter_records(g)] == [(0, 1), (1, 3)]


# ---------------------------------------------------------------- hostile input


def _record(**changes: object) -> dict:
    rec = json.loads((FIX / "vlkeb/eval.json").read_text())[0]
    rec.update(changes)
    return {k: v for k, v in rec.items() if v is not None}


def _write(tmp_path: Path, records: list, name: str = "eval.json") -> Path:
    f = tmp_path / name
    f.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return f


def _error(spec: str, root: Path = IMAGES, **kw: object) -> str:
    with pytest.raises(BadRecordError) as e:
        load_benchmark(spec, root, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"alt": None}, "field 'alt' missing"),
        ({"alt": "  "}, "field 'alt' is empty"),
        ({"src": ["a", "list"]}, "field 'src' must be a string, got a list"),
        ({"image": "../images/m.0abc12/google_3.jpg"}, "escapes the data root"),
        ({"image": "/etc/passwd"}, "is absolute"),
        ({"image": "m.0abc12/missing.jpg"}, "not found"),
        ({"port_new": {"port_type": "1-hop"}}, "field 'port_new' must be a list"),
        ({"port_new": [{"port_type": "9-hop", "Q&A": {}}]}, "port_type must be '1-hop'..'4-hop'"),
        ({"port_new": [{"port_type": "1-hop", "Q&A": {"Question": "q"}}]}, "Q&A.Answer"),
        ({"rephrase": "x" * (MAX_FIELD_CHARS + 1)}, "field 'rephrase' is 16,385 characters long"),
    ],
)
def test_a_bad_record_is_one_line_naming_file_line_and_case(
    tmp_path: Path, changes: dict, problem: str
) -> None:
    f = _write(tmp_path, [json.loads((FIX / "vlkeb/eval.json").read_text())[1], _record(**changes)])
    msg = _error(f"vlkeb:{f}")
    assert msg.startswith(f"{f}:") and "(eval-00001)" in msg and problem in msg, msg


def test_a_record_that_is_not_an_object(tmp_path: Path) -> None:
    f = _write(tmp_path, [_record(), "just a string"])
    assert "(eval-00001): record must be a JSON object, got a string" in _error(f"vlkeb:{f}")


def test_duplicates_are_reported(tmp_path: Path) -> None:
    f = _write(tmp_path, [_record(), _record()])
    assert "duplicate of the record on line 2" in _error(f"vlkeb:{f}")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[{"src": "a",\n "alt": }]', ":2: invalid JSON (Expecting value at column 9)"),
        ('[{"src": "a"} {"src": "b"}]', ":1: invalid JSON (expected ',' or ']'"),
        ("", "file is empty"),
        ("[]", "no records"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_malformed_json_is_one_line(tmp_path: Path, text: str, problem: str) -> None:
    f = tmp_path / "eval.json"
    f.write_text(text)
    assert problem in _error(f"vlkeb:{f}")


def test_non_utf8_and_missing_files(tmp_path: Path) -> None:
    f = tmp_path / "eval.json"
    f.write_bytes(b'[{"src": "caf\xe9"}]')
    assert "file is not UTF-8 text" in _error(f"vlkeb:{f}")
    with pytest.raises(ConfigError, match="not found"):
        load_benchmark(f"vlkeb:{tmp_path / 'nope.json'}", IMAGES)


def _images_copy(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for src in IMAGES.rglob("*"):
        if src.is_file():
            dst = root / src.relative_to(IMAGES)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    return root


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "corrupt or truncated"),
        (lambda p: p.write_bytes(b"GIF89a not really"), "corrupt or truncated"),
    ],
)
def test_corrupt_zero_byte_and_truncated_images(tmp_path: Path, damage, problem: str) -> None:
    root = _images_copy(tmp_path)
    damage(root / "m.0abc12/bing_7.jpg")
    msg = _error(f"vlkeb:{FIX / 'vlkeb/eval.json'}", root)
    assert "(eval-00000): field 'image_rephrase': image 'bing_7.jpg'" in msg and problem in msg


def test_a_symlink_out_of_the_root_is_refused(tmp_path: Path) -> None:
    root = _images_copy(tmp_path)
    outside = tmp_path / "secret.jpg"
    outside.write_bytes((IMAGES / "m.0abc12/google_3.jpg").read_bytes())
    (root / "m.0abc12/google_3.jpg").unlink()
    os.symlink(outside, root / "m.0abc12/google_3.jpg")
    assert "resolves outside the data root" in _error(f"vlkeb:{FIX / 'vlkeb/eval.json'}", root)


def test_skip_bad_keeps_the_good_cases_and_lists_the_bad(tmp_path: Path) -> None:
    good = json.loads((FIX / "vlkeb/eval.json").read_text())[1]
    f = _write(tmp_path, [_record(alt=None), good, _record(image="../x.jpg")])
    bench = load_benchmark(f"vlkeb:{f}", IMAGES, skip_bad=True)
    assert [c.case_id for c in bench.cases] == ["eval-00001"]
    starts = [i for i, line in enumerate(f.read_text().splitlines(), start=1) if line == " {"]
    assert [(p.case_id, p.line) for p in bench.skipped] == [
        ("eval-00000", starts[0]),
        ("eval-00002", starts[2]),
    ]


def test_a_50mb_single_line_file_loads_fast_or_fails_fast(tmp_path: Path) -> None:
    base = json.loads((FIX / "vlkeb/eval.json").read_text())
    many = [dict(base[i % 2], src=f"{base[i % 2]['src']} #{i}") for i in range(130_000)]
    f = tmp_path / "big.json"
    f.write_text(json.dumps(many))  # one line, like the real files
    assert f.stat().st_size > 50e6
    start = time.perf_counter()
    bench = load_benchmark(f"vlkeb:{f}", IMAGES)
    assert len(bench.cases) == 130_000 and time.perf_counter() - start < 60
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps([dict(base[0], src="x" * 50_000_000)]))
    start = time.perf_counter()
    assert "field 'src' is 50,000,000 characters long" in _error(f"vlkeb:{huge}")
    assert time.perf_counter() - start < 30


# ---------------------------------------------------------------- the command line


def test_validate_lists_every_bad_record(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    f = _write(tmp_path, [_record(alt=None), _record(src="other"), _record(image="/abs.jpg")])
    assert main(["validate", "--format", "vlkeb", str(f), "--image-root", str(IMAGES)]) == 1
    out = capsys.readouterr().out.replace("\n", " ")
    assert f"{f}:2 (eval-00000): field 'alt' missing" in out
    assert "(eval-00002)" in out and "2 problem(s)" in out and "1 good case(s)" in out
    ok = FIX / "vlkeb/eval.json"
    assert main(["validate", "--format", "vlkeb", str(ok), "--image-root", str(IMAGES)]) == 0


def test_convert_to_native_round_trips(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "conv" / "cases.jsonl"
    src = FIX / "vlkeb/eval_multihop.json"
    args = ["convert", "--from", "vlkeb", str(src), "--to", "native", "--out", str(out)]
    assert main([*args, "--image-root", str(IMAGES)]) == 0
    assert "wrote 2 cases" in capsys.readouterr().out
    native = load_benchmark(f"native:{out}")  # the header's image_root finds the images
    foreign = load_benchmark(f"vlkeb:{src}", IMAGES)
    strip = [c.probes for c in foreign.cases]
    assert [c.probes for c in native.cases] == strip
    assert [c.edit for c in native.cases] == [c.edit for c in foreign.cases]
    assert main([*args[:-2], "--to", "mmedit", "--out", str(out)]) == 2


def test_run_on_a_vlkeb_file_end_to_end(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = _write(tmp_path, [*json.loads((FIX / "vlkeb/eval_multihop.json").read_text()), _record(alt=None)])
    args = ["run", "--benchmark", f"vlkeb:{bad}", "--image-root", str(IMAGES), "--model", "world"]
    args += ["methods=[grace,ike]", f"out={tmp_path / 'runs'}"]
    assert main([*args, "--run-id", "stopped"]) == 2  # a bad record stops the run before any editing
    assert "(eval-00002): field 'alt' missing" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "stopped").exists()  # checked before any run folder is made
    assert main([*args, "--skip-bad", "--run-id", "r"]) == 1  # finished, but IKE could not run
    out = capsys.readouterr().out
    assert "incomplete: ike not run (ike: no train cases" in out
    assert "1 bad benchmark record(s) skipped" in out
    run = tmp_path / "runs" / "r"
    skipped = [json.loads(x) for x in (run / "skipped.jsonl").read_text().splitlines()]
    assert [s["case_id"] for s in skipped] == ["eval-00002"]
    summary = json.loads((run / "summary.json").read_text())
    grace = [g for g in summary["groups"] if g["method"] == "grace" and g["edit_type"] == "all"]
    assert grace and grace[0]["n_cases"] == 2 and grace[0]["metrics"]["portability"] is not None
    capsys.readouterr()
    assert main(["report", str(run), "--table", "mmke_bench"]) == 0
    assert "MMKE-Bench Tables 3-5" in capsys.readouterr().out
    assert main(["report", str(run), "--table", "mmke_bnch"]) == 2
    assert "did you mean 'mmke_bench'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("fmt", "file"),
    [
        ("mmedit", "mmedit/vqa_eval.json"),
        ("mmedit", "mmedit/caption_eval_edit.json"),
        ("vlkeb", "vlkeb/eval_edit_onehop.json"),
        ("mmke_bench", "mmke_bench/entity_eval.json"),
        ("mmke_bench", "mmke_bench/visual_eval.json"),
        ("mmke_bench", "mmke_bench/user_eval.json"),
        ("medmcq", "medmcq/medmcq_eval.json"),
    ],
)
def test_every_fixture_validates_and_converts_to_the_same_cases(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, fmt: str, file: str
) -> None:
    src, out = FIX / file, tmp_path / "cases.jsonl"
    assert main(["validate", "--format", fmt, str(src), "--image-root", str(IMAGES)]) == 0
    assert main(["convert", "--from", fmt, str(src), "--out", str(out), "--image-root", str(IMAGES)]) == 0
    foreign, native = load_benchmark(f"{fmt}:{src}", IMAGES), load_benchmark(f"native:{out}")
    assert [(c.edit, c.probes, c.edit_type) for c in native.cases] == [
        (c.edit, c.probes, c.edit_type) for c in foreign.cases
    ]
