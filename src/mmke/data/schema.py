"""The native case format: versioned JSONL (a header line, then one EditCase per line) and its validator.

Every problem is reported as ``file:line (case-id): problem`` so a user can fix the record.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmke.data.checks import (
    MAX_LIST_ITEMS,
    FieldError,
    ImagePathChecks,
    check_text,
    loads_record,
    utf8_lines,
)
from mmke.errors import BadRecordError
from mmke.types import AttackType, EditCase, EditFact, EditType, ImageRef, Probe, ProbeKind, Sample

FORMAT = "mmke-cases"
VERSION = 1
SAMPLES_FORMAT = "mmke-samples"


# ---------------------------------------------------------------- encoding


def image_to_json(image: ImageRef | None) -> str | None:
    return None if image is None else image.path


def fact_to_json(fact: EditFact) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt": fact.prompt, "target": fact.target}
    if fact.image is not None:
        out["image"] = fact.image.path
    if fact.ground_truth is not None:
        out["ground_truth"] = fact.ground_truth
    if fact.options:
        out["options"] = list(fact.options)
    return out


def probe_to_json(probe: Probe) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": probe.kind.value, "prompt": probe.prompt, "target": probe.target}
    if probe.image is not None:
        out["image"] = probe.image.path
    if probe.hop is not None:
        out["hop"] = probe.hop
    if probe.attack is not None:
        out["attack"] = probe.attack.value
    if probe.options:
        out["options"] = list(probe.options)
    if probe.aliases:
        out["aliases"] = list(probe.aliases)
    if probe.onehop_edit is not None:
        out["onehop_edit"] = fact_to_json(probe.onehop_edit)
    if probe.group is not None:
        out["group"] = probe.group
    if probe.variant is not None:
        out["variant"] = probe.variant
    return out


def case_to_json(case: EditCase) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": case.case_id,
        "edit_type": case.edit_type.value,
        "edit": fact_to_json(case.edit),
        "probes": [probe_to_json(p) for p in case.probes],
    }
    if case.subject is not None:
        out["subject"] = case.subject
    if case.meta:
        out["meta"] = dict(sorted(case.meta.items()))
    if case.companions:
        out["companions"] = [fact_to_json(f) for f in case.companions]
    if case.task is not None:
        out["task"] = case.task
    return out


def dumps_line(obj: Any) -> str:
    """One canonical JSON line: sorted keys, no ASCII escaping, so equal data gives equal bytes."""
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def write_cases(path: Path, cases: Iterable[EditCase], header: dict[str, Any] | None = None) -> int:
    """Write cases to ``path`` in the native format; returns how many were written."""
    head = {"format": FORMAT, "version": VERSION, **(header or {})}
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(dumps_line(head) + "\n")
        for case in cases:
            f.write(dumps_line(case_to_json(case)) + "\n")
            n += 1
    return n


def write_samples(path: Path, samples: Iterable[Sample], header: dict[str, Any] | None = None) -> int:
    """Write training samples (prompt, image, target) as JSONL with a header line."""
    head = {"format": SAMPLES_FORMAT, "version": VERSION, **(header or {})}
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(dumps_line(head) + "\n")
        for s in samples:
            rec: dict[str, Any] = {"prompt": s.prompt, "target": s.target}
            if s.image is not None:
                rec["image"] = s.image.path
            f.write(dumps_line(rec) + "\n")
            n += 1
    return n


# ---------------------------------------------------------------- decoding + validation


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one record."""

    file: str
    line: int
    case_id: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        return f"{where} ({self.case_id}): {self.message}" if self.case_id else f"{where}: {self.message}"


def _str(rec: dict[str, Any], key: str, *, required: bool = True, nonempty: bool = False) -> str | None:
    if key not in rec or rec[key] is None:
        if required:
            raise FieldError(f"field {key!r} missing")
        return None
    val = rec[key]
    if not isinstance(val, str):
        raise FieldError(f"field {key!r} must be a string, got {type(val).__name__}")
    if nonempty and not val.strip():
        raise FieldError(f"field {key!r} is empty")
    return check_text(val, key)


def _image(rec: dict[str, Any], checks: ImagePathChecks) -> ImageRef | None:
    path = _str(rec, "image", required=False)
    if path is None:
        return None
    why = checks(path)
    if why:
        raise FieldError(why)
    return ImageRef(path)


def _options(rec: dict[str, Any], name: str = "options") -> tuple[str, ...]:
    opts = rec.get(name, [])
    if not isinstance(opts, list) or not all(isinstance(o, str) and o.strip() for o in opts):
        raise FieldError(f"field '{name}' must be a list of non-empty strings")
    if len(opts) > MAX_LIST_ITEMS:
        raise FieldError(f"field '{name}' has {len(opts)} items (limit {MAX_LIST_ITEMS})")
    return tuple(check_text(o, name) for o in opts)


def _fact(rec: Any, checks: ImagePathChecks, where: str) -> EditFact:
    if not isinstance(rec, dict):
        raise FieldError(f"{where} must be an object")
    try:
        return EditFact(
            prompt=_str(rec, "prompt", nonempty=True) or "",
            target=_str(rec, "target", nonempty=True) or "",
            image=_image(rec, checks),
            ground_truth=_str(rec, "ground_truth", required=False),
            options=_options(rec),
        )
    except FieldError as e:
        raise FieldError(f"{where}: {e}") from None


def _enum(enum: type, value: Any, what: str) -> Any:
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(m.value for m in enum)
        raise FieldError(f"unknown {what} {value!r} (expected one of: {choices})") from None


def _probe(rec: Any, checks: ImagePathChecks, i: int) -> Probe:
    where = f"probe {i}"
    if not isinstance(rec, dict):
        raise FieldError(f"{where} must be an object")
    try:
        kind = _enum(ProbeKind, _str(rec, "kind"), "probe kind")
        hop = rec.get("hop")
        if hop is not None and (not isinstance(hop, int) or isinstance(hop, bool) or not 1 <= hop <= 4):
            raise FieldError(f"hop must be an integer 1-4, got {hop!r}")
        if kind == ProbeKind.PORTABILITY and hop is None:
            raise FieldError("portability probe needs 'hop'")
        attack = rec.get("attack")
        attack = None if attack is None else _enum(AttackType, attack, "attack type")
        if kind == ProbeKind.ROBUSTNESS and attack is None:
            raise FieldError("robustness probe needs 'attack'")
        onehop = rec.get("onehop_edit")
        variant = rec.get("variant")
        if variant is not None and (not isinstance(variant, int) or isinstance(variant, bool) or variant < 0):
            raise FieldError(f"variant must be an integer >= 0, got {variant!r}")
        return Probe(
            kind=kind,
            prompt=_str(rec, "prompt", nonempty=True) or "",
            target=_str(rec, "target", nonempty=True) or "",
            image=_image(rec, checks),
            hop=hop,
            attack=attack,
            options=_options(rec),
            aliases=_options(rec, "aliases"),
            onehop_edit=None if onehop is None else _fact(onehop, checks, "onehop_edit"),
            group=_str(rec, "group", required=False),
            variant=variant,
        )
    except FieldError as e:
        raise FieldError(f"{where} ({rec.get('kind', '?')}): {e}") from None


def case_from_json(rec: Any, root: Path | ImagePathChecks | None = None) -> EditCase:
    """Decode one case record; raises ``FieldError`` style errors as BadRecordError-ready text."""
    checks = root if isinstance(root, ImagePathChecks) else ImagePathChecks(root)
    if not isinstance(rec, dict):
        raise FieldError("record must be a JSON object")
    case_id = _str(rec, "id", nonempty=True) or ""
    probes = rec.get("probes")
    if not isinstance(probes, list) or not probes:
        raise FieldError("field 'probes' must be a non-empty list")
    if len(probes) > MAX_LIST_ITEMS:
        raise FieldError(f"field 'probes' has {len(probes)} items (limit {MAX_LIST_ITEMS})")
    meta = rec.get("meta", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FieldError("field 'meta' must be an object of strings")
    for key, value in meta.items():
        check_text(value, f"meta.{key}")
    companions = rec.get("companions", [])
    if not isinstance(companions, list) or len(companions) > MAX_LIST_ITEMS:
        raise FieldError(f"field 'companions' must be a list of at most {MAX_LIST_ITEMS} edits")
    return EditCase(
        case_id=case_id,
        edit_type=_enum(EditType, _str(rec, "edit_type"), "edit type"),
        edit=_fact(rec.get("edit"), checks, "edit"),
        probes=tuple(_probe(p, checks, i) for i, p in enumerate(probes)),
        subject=_str(rec, "subject", required=False),
        meta=dict(meta),
        companions=tuple(_fact(f, checks, f"companions[{i}]") for i, f in enumerate(companions)),
        task=_str(rec, "task", required=False, nonempty=True),
    )


def _header_problem(line: str | None) -> str | None:
    if line is None:
        return "header is not UTF-8 text"
    if not line.strip():
        return "file is empty (no header line)"
    try:
        head = loads_record(line)
    except (json.JSONDecodeError, FieldError) as e:
        return f"header is not valid JSON ({getattr(e, 'msg', e)})"
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        return f"not an mmke case file (header 'format' must be {FORMAT!r})"
    if head.get("version") != VERSION:
        return f"unsupported format version {head.get('version')!r} (this mmke reads {VERSION})"
    return None


def _read_bytes(path: Path) -> bytes | str:
    """The file's bytes, or why it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as e:
        return f"cannot open: {e.strerror}"


def iter_validated(
    path: Path, root: Path | None = None, *, decode_images: bool = True
) -> Iterator[EditCase | Problem]:
    """Yield each case of ``path`` or, for a bad record, a Problem; duplicates are problems too.

    Every image a case names must decode (``mmke.data.checks``), as in the foreign readers;
    ``decode_images=False`` checks paths only, for files mmke generated itself.
    """
    name = str(path)
    data = _read_bytes(path)
    if isinstance(data, str):
        yield Problem(name, 0, None, data)
        return
    lines = utf8_lines(data)
    _, first = next(lines)
    why = _header_problem(first)
    if why:
        yield Problem(name, 1, None, why)
        return
    seen: dict[str, int] = {}
    checks = ImagePathChecks(root, decode=decode_images)
    for lineno, line in lines:
        if line is None:
            yield Problem(name, lineno, None, "line is not UTF-8 text")
        elif line.strip():
            yield _decode_line(line, lineno, name, checks, seen)


def _decode_line(
    line: str, lineno: int, name: str, checks: ImagePathChecks, seen: dict[str, int]
) -> EditCase | Problem:
    try:
        rec = loads_record(line)
    except json.JSONDecodeError as e:
        return Problem(name, lineno, None, f"invalid JSON ({e.msg} at column {e.colno})")
    except FieldError as e:
        return Problem(name, lineno, None, str(e))
    cid = rec.get("id") if isinstance(rec, dict) and isinstance(rec.get("id"), str) else None
    if cid is not None:  # the one-line error must stay one printable, readable line
        cid = cid.encode("utf-8", "backslashreplace").decode("utf-8")
        cid = cid if len(cid) <= 80 else cid[:80] + "…"
    try:
        case = case_from_json(rec, checks)
    except FieldError as e:
        return Problem(name, lineno, cid, str(e))
    if case.case_id in seen:
        return Problem(name, lineno, cid, f"duplicate id (first seen on line {seen[case.case_id]})")
    seen[case.case_id] = lineno
    return case


def validate(path: Path, root: Path | None = None) -> list[Problem]:
    """Every problem in a case file (an empty list means the file is good)."""
    return [x for x in iter_validated(path, root) if isinstance(x, Problem)]


def read_cases(path: Path, root: Path | None = None, *, decode_images: bool = True) -> list[EditCase]:
    """Read a native case file, refusing it whole if any record is bad (before any editing starts)."""
    cases: list[EditCase] = []
    problems: list[Problem] = []
    for x in iter_validated(path, root, decode_images=decode_images):
        (problems if isinstance(x, Problem) else cases).append(x)  # type: ignore[arg-type]
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise BadRecordError(f"{problems[0]}{more}")
    return cases


def read_header(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            first = f.readline()
    except OSError as e:
        raise BadRecordError(f"{path}: cannot open: {e.strerror}") from None
    _, line = next(utf8_lines(first.rstrip(b"\n")))
    why = _header_problem(line)
    if why:
        raise BadRecordError(f"{path}:1: {why}")
    return json.loads(line)  # type: ignore[arg-type]


def read_samples(path: Path) -> list[Sample]:
    """Read a training-sample file written by ``write_samples``."""
    out: list[Sample] = []
    with open(path, encoding="utf-8") as f:
        head = json.loads(f.readline() or "{}")
        if head.get("format") != SAMPLES_FORMAT:
            raise BadRecordError(f"{path}:1: not an mmke sample file")
        for lineno, line in enumerate(f, start=2):
            try:
                rec = json.loads(line)
                img = rec.get("image")
                out.append(Sample(rec["prompt"], rec["target"], None if img is None else ImageRef(img)))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise BadRecordError(f"{path}:{lineno}: bad sample ({e})") from None
    return out
