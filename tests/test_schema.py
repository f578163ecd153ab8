"""The native case format: exact round trip and a validator that names file, line and case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from mmke.data.checks import check_image_path
from mmke.data.schema import read_cases, validate, write_cases
from mmke.errors import BadRecordError
from mmke.types import AttackType, EditCase, EditFact, EditType, ImageRef, Probe, ProbeKind


def _case(cid: str = "c1") -> EditCase:
    img = ImageRef("img/a.png")
    return EditCase(
        case_id=cid,
        edit_type=EditType.VISUAL_ENTITY,
        edit=EditFact("Who is this?", "mira talvek", img, ground_truth="oren daskel"),
        probes=(
            Probe(ProbeKind.RELIABILITY, "Who is this?", "mira talvek", img),
            Probe(ProbeKind.TEXT_LOCALITY, "What is the capital of zerania?", "vellor"),
            Probe(
                ProbeKind.PORTABILITY,
                "Where was the person in the image born?",
                "vellor",
                img,
                hop=1,
                onehop_edit=EditFact("Where was mira talvek born?", "vellor"),
            ),
            Probe(
                ProbeKind.ROBUSTNESS,
                "Experts say oren. Who is this?",
                "mira talvek",
                img,
                attack=AttackType.PSEUDO_AUTHORITY,
            ),
            Probe(ProbeKind.IMAGE_RELIABILITY, "Pick one: A. x B. y", "x", img, options=("x", "y")),
        ),
        subject="e1",
        meta={"split": "eval", "zz": "ünïcode ✓"},
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    Image.new("RGB", (4, 4), "red").save(tmp_path / "img" / "a.png")
    return tmp_path


def test_round_trip_is_exact(root: Path) -> None:
    cases = [_case("c1"), _case("c2")]
    f = root / "cases.jsonl"
    write_cases(f, cases, {"benchmark": "t"})
    assert read_cases(f, root) == cases
    first = f.read_bytes()
    write_cases(f, read_cases(f, root), {"benchmark": "t"})
    assert f.read_bytes() == first


def _write_raw(root: Path, records: list) -> Path:
    f = root / "bad.jsonl"
    lines = [json.dumps({"format": "mmke-cases", "version": 1})]
    lines += [r if isinstance(r, str) else json.dumps(r) for r in records]
    f.write_text("\n".join(lines) + "\n")
    return f


def _good() -> dict:
    from mmke.data.schema import case_to_json

    return case_to_json(_case("ok"))


def _mutate(path: list, value: object = None, delete: bool = False) -> dict:
    rec = _good()
    rec["id"] = "bad"
    node = rec
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return rec


@pytest.mark.parametrize(
    ("record", "expect"),
    [
        (_mutate(["edit", "target"], delete=True), "edit: field 'target' missing"),
        (_mutate(["edit", "target"], 5), "must be a string"),
        (_mutate(["edit", "target"], "  "), "is empty"),
        (_mutate(["probes", 0, "target"], ""), "probe 0 (reliability): field 'target' is empty"),
        (_mutate(["probes", 0, "kind"], "reliabilty"), "unknown probe kind 'reliabilty'"),
        (_mutate(["edit_type"], "visual"), "unknown edit type"),
        (_mutate(["probes", 2, "hop"], 7), "hop must be an integer 1-4"),
        (_mutate(["probes", 2, "hop"], delete=True), "portability probe needs 'hop'"),
        (_mutate(["probes", 3, "attack"], "shouting"), "unknown attack type"),
        (_mutate(["probes"], []), "'probes' must be a non-empty list"),
        (_mutate(["edit", "image"], "/etc/passwd"), "is absolute"),
        (_mutate(["edit", "image"], "../secret.png"), "escapes the data root"),
        (_mutate(["probes", 1, "image"], "img/../../x.png"), "escapes the data root"),
        (_mutate(["edit", "image"], "C:\\x.png"), "not a relative POSIX path"),
        (_mutate(["edit", "image"], "img/missing.png"), "not found"),
    ],
)
def test_validator_names_file_line_and_case(root: Path, record: dict, expect: str) -> None:
    f = _write_raw(root, [_good(), record])
    problems = validate(f, root)
    assert len(problems) == 1
    msg = str(problems[0])
    assert msg.startswith(f"{f}:3 (bad): "), msg
    assert expect in msg
    with pytest.raises(BadRecordError, match=r"bad\.jsonl:3 \(bad\)"):
        read_cases(f, root)


def test_validator_reports_every_bad_record(root: Path) -> None:
    dup = _good()
    f = _write_raw(root, [_good(), "{not json", dup, [1, 2], _mutate(["id"], "")])
    problems = [str(p) for p in validate(f, root)]
    assert len(problems) == 4
    assert problems[0].startswith(f"{f}:3: invalid JSON")
    assert problems[1].startswith(f"{f}:4 (ok): duplicate id (first seen on line 2)")
    assert problems[2].startswith(f"{f}:5: record must be a JSON object")
    assert "field 'id' is empty" in problems[3]


def test_header_is_checked(root: Path) -> None:
    f = root / "x.jsonl"
    f.write_text('{"format": "other", "version": 1}\n')
    assert "not an mmke case file" in str(validate(f, root)[0])
    f.write_text('{"format": "mmke-cases", "version": 99}\n')
    assert "unsupported format version 99" in str(validate(f, root)[0])
    f.write_text("")
    assert "empty" in str(validate(f, root)[0])


def test_symlink_out_of_root_is_rejected(root: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = tmp_path_factory.mktemp("outside") / "o.png"
    outside.write_bytes(b"x")
    (root / "img" / "link.png").symlink_to(outside)
    assert "outside the data root" in (check_image_path("img/link.png", root) or "")
    assert check_image_path("img/a.png", root) is None


def bomb_png(path: Path, width: int = 20_000, height: int = 20_000) -> Path:
    """A few hundred bytes that claim ``width x height`` pixels (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )
    return path


@pytest.mark.parametrize(
    ("make", "expect"),
    [
        (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
        (lambda p: p.write_bytes(p.read_bytes()[:40]), "corrupt or truncated"),
        (lambda p: p.write_text("I am text, named .png"), "corrupt or truncated"),
        (bomb_png, "too large to decode safely"),
        (lambda p: bomb_png(p, 9_000, 9_000), "9000x9000 pixels, over the limit"),
    ],
)
def test_native_reader_decodes_every_image(root: Path, make, expect: str) -> None:
    """Issue 19.2: zero-byte, truncated, text-named and bomb images were 'ok' until the run."""
    bad = root / "img" / "bad.png"
    bad.write_bytes((root / "img" / "a.png").read_bytes())
    make(bad)
    f = _write_raw(root, [_good(), _mutate(["probes", 0, "image"], "img/bad.png")])
    problems = [str(p) for p in validate(f, root)]
    assert len(problems) == 1 and problems[0].startswith(f"{f}:3 (bad): probe 0 (reliability)")
    assert expect in problems[0]


def test_native_strings_and_lists_are_capped(root: Path) -> None:
    """Issue 19.3: a 1 MB prompt ran for minutes; the foreign readers' cap applies to native too."""
    from mmke.data.checks import MAX_FIELD_CHARS, MAX_LIST_ITEMS

    long = _mutate(["probes", 0, "prompt"], "x" * 1_000_000)
    many = _mutate(["probes"], [_good()["probes"][1]] * (MAX_LIST_ITEMS + 1))
    many["id"] = "many"
    f = _write_raw(root, [long, many])
    problems = [str(p) for p in validate(f, root)]
    assert f"field 'prompt' is 1,000,000 characters long (limit {MAX_FIELD_CHARS:,})" in problems[0]
    assert f"'probes' has {MAX_LIST_ITEMS + 1} items" in problems[1]


def test_native_encoding_nesting_and_bom(root: Path) -> None:
    """Issue 19.4: non-UTF-8 bytes and deep nesting were raw tracebacks; a BOM was refused."""
    f = _write_raw(root, [_good()])
    good = f.read_bytes()
    f.write_bytes(b"\xef\xbb\xbf" + good)  # a BOM: accepted, as the foreign readers accept it
    assert validate(f, root) == []
    deep: object = 1
    for _ in range(40):  # deeper than any record, shallow enough for json to decode
        deep = [deep]
    lines = [b'{"id": "caf\xe9"}', b"[" * 100_000, json.dumps(_good()).encode(), json.dumps(deep).encode()]
    f.write_bytes(good + b"\n".join(lines) + b"\n")
    problems = [str(p) for p in validate(f, root)]
    assert problems[0] == f"{f}:3: line is not UTF-8 text"
    assert problems[1].startswith(f"{f}:4: invalid JSON (nested deeper than")
    assert "duplicate id" in problems[2]
    assert problems[3].startswith(f"{f}:6: invalid JSON (nested deeper than")
    assert len(problems) == 4
