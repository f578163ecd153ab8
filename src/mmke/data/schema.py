"""The native case format: versioned JSONL (a header line, then one EditCase per line) and its validator.

Every problem is reported as ``file:line (case-id): problem`` so a user can fix the record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

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
    if probe.onehop_edit is not None:
        out["onehop_edit"] = fact_to_json(probe.onehop_edit)
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


class _Bad(Exception):
    """Internal: a field problem found while decoding one record."""


def check_image_path(path: str, root: Path | None = None) -> str | None:
    """Why ``path`` is not an acceptable image reference under ``root`` (None when it is).

    Rejects absolute paths, drive letters, backslashes and ``..`` segments; with a root,
    also a target that resolves (through symlinks) outside the root, or that is missing.
    """
    return ImagePathChecks(root)(path)


class ImagePathChecks:
    """``check_image_path`` for the many references of one file under one root.

    The root is resolved once and each distinct path checked once: a world case file names
    each picture in several probes, and resolving them all took 1.7 s of every run's start.
    """

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self._root_real = None if root is None else Path(os.path.realpath(root))
        self._seen: dict[str, str | None] = {}

    def __call__(self, path: str) -> str | None:
        if path not in self._seen:
            self._seen[path] = self._check(path)
        return self._seen[path]

    def _check(self, path: str) -> str | None:
        if not path:
            return "image path is empty"
        if "\\" in path or (len(path) > 1 and path[1] == ":"):
            return f"image path {path!r} is not a relative POSIX path"
        pure = PurePosixPath(path)
        if pure.is_absolute():
            return f"image path {path!r} is absolute; paths must be relative to the data root"
        if ".." in pure.parts:
            return f"image path {path!r} escapes the data root"
        if self._root_real is not None:
            real = Path(os.path.realpath(self._root_real / pure))
            if not real.is_relative_to(self._root_real):
                return f"image path {path!r} resolves outside the data root (symlink?)"
            if not real.is_file():
                return f"image {path!r} not found under {self.root}"
        return None


def _str(rec: dict[str, Any], key: str, *, required: bool = True, nonempty: bool = False) -> str | None:
    if key not in rec or rec[key] is None:
        if required:
            raise _Bad(f"field {key!r} missing")
        return None
    val = rec[key]
    if not isinstance(val, str):
        raise _Bad(f"field {key!r} must be a string, got {type(val).__name__}")
    if nonempty and not val.strip():
        raise _Bad(f"field {key!r} is empty")
    return val


def _image(rec: dict[str, Any], checks: ImagePathChecks) -> ImageRef | None:
    path = _str(rec, "image", required=False)
    if path is None:
        return None
    why = checks(path)
    if why:
        raise _Bad(why)
    return ImageRef(path)


def _options(rec: dict[str, Any]) -> tuple[str, ...]:
    opts = rec.get("options", [])
    if not isinstance(opts, list) or not all(isinstance(o, str) and o.strip() for o in opts):
        raise _Bad("field 'options' must be a list of non-empty strings")
    return tuple(opts)


def _fact(rec: Any, checks: ImagePathChecks, where: str) -> EditFact:
    if not isinstance(rec, dict):
        raise _Bad(f"{where} must be an object")
    try:
        return EditFact(
            prompt=_str(rec, "prompt", nonempty=True) or "",
            target=_str(rec, "target", nonempty=True) or "",
            image=_image(rec, checks),
            ground_truth=_str(rec, "ground_truth", required=False),
            options=_options(rec),
        )
    except _Bad as e:
        raise _Bad(f"{where}: {e}") from None


def _enum(enum: type, value: Any, what: str) -> Any:
    try:
        return enum(value)
    except ValueError:
        choices = ", ".join(m.value for m in enum)
        raise _Bad(f"unknown {what} {value!r} (expected one of: {choices})") from None


def _probe(rec: Any, checks: ImagePathChecks, i: int) -> Probe:
    where = f"probe {i}"
    if not isinstance(rec, dict):
        raise _Bad(f"{where} must be an object")
    try:
        kind = _enum(ProbeKind, _str(rec, "kind"), "probe kind")
        hop = rec.get("hop")
        if hop is not None and (not isinstance(hop, int) or isinstance(hop, bool) or not 1 <= hop <= 4):
            raise _Bad(f"hop must be an integer 1-4, got {hop!r}")
        if kind == ProbeKind.PORTABILITY and hop is None:
            raise _Bad("portability probe needs 'hop'")
        attack = rec.get("attack")
        attack = None if attack is None else _enum(AttackType, attack, "attack type")
        if kind == ProbeKind.ROBUSTNESS and attack is None:
            raise _Bad("robustness probe needs 'attack'")
        onehop = rec.get("onehop_edit")
        return Probe(
            kind=kind,
            prompt=_str(rec, "prompt", nonempty=True) or "",
            target=_str(rec, "target", nonempty=True) or "",
            image=_image(rec, checks),
            hop=hop,
            attack=attack,
            options=_options(rec),
            onehop_edit=None if onehop is None else _fact(onehop, checks, "onehop_edit"),
        )
    except _Bad as e:
        raise _Bad(f"{where} ({rec.get('kind', '?')}): {e}") from None


def case_from_json(rec: Any, root: Path | ImagePathChecks | None = None) -> EditCase:
    """Decode one case record; raises ``_Bad`` style errors as BadRecordError-ready text."""
    checks = root if isinstance(root, ImagePathChecks) else ImagePathChecks(root)
    if not isinstance(rec, dict):
        raise _Bad("record must be a JSON object")
    case_id = _str(rec, "id", nonempty=True) or ""
    probes = rec.get("probes")
    if not isinstance(probes, list) or not probes:
        raise _Bad("field 'probes' must be a non-empty list")
    meta = rec.get("meta", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _Bad("field 'meta' must be an object of strings")
    return EditCase(
        case_id=case_id,
        edit_type=_enum(EditType, _str(rec, "edit_type"), "edit type"),
        edit=_fact(rec.get("edit"), checks, "edit"),
        probes=tuple(_probe(p, checks, i) for i, p in enumerate(probes)),
        subject=_str(rec, "subject", required=False),
        meta=dict(meta),
    )


def _header_problem(line: str, name: str) -> str | None:
    try:
        head = json.loads(line)
    except json.JSONDecodeError as e:
        return f"header is not valid JSON ({e.msg})"
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        return f"not an mmke case file (header 'format' must be {FORMAT!r})"
    if head.get("version") != VERSION:
        return f"unsupported format version {head.get('version')!r} (this mmke reads {VERSION})"
    return None


def iter_validated(path: Path, root: Path | None = None) -> Iterator[EditCase | Problem]:
    """Yield each case of ``path`` or, for a bad record, a Problem; duplicates are problems too."""
    name = str(path)
    seen: dict[str, int] = {}
    checks = ImagePathChecks(root)
    try:
        f = open(path, encoding="utf-8")  # noqa: SIM115 -- an unreadable file is a Problem, not a raise
    except OSError as e:
        yield Problem(name, 0, None, f"cannot open: {e.strerror}")
        return
    with f:
        try:
            first = f.readline()
        except UnicodeDecodeError:
            yield Problem(name, 1, None, "file is not UTF-8 text")
            return
        why = _header_problem(first, name) if first.strip() else "file is empty (no header line)"
        if why:
            yield Problem(name, 1, None, why)
            return
        for lineno, line in enumerate(f, start=2):
            if not line.strip():
                continue
            yield _decode_line(line, lineno, name, checks, seen)


def _decode_line(
    line: str, lineno: int, name: str, checks: ImagePathChecks, seen: dict[str, int]
) -> EditCase | Problem:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        return Problem(name, lineno, None, f"invalid JSON ({e.msg} at column {e.colno})")
    cid = rec.get("id") if isinstance(rec, dict) and isinstance(rec.get("id"), str) else None
    try:
        case = case_from_json(rec, checks)
    except _Bad as e:
        return Problem(name, lineno, cid, str(e))
    if case.case_id in seen:
        return Problem(name, lineno, cid, f"duplicate id (first seen on line {seen[case.case_id]})")
    seen[case.case_id] = lineno
    return case


def validate(path: Path, root: Path | None = None) -> list[Problem]:
    """Every problem in a case file (an empty list means the file is good)."""
    return [x for x in iter_validated(path, root) if isinstance(x, Problem)]


def read_cases(path: Path, root: Path | None = None) -> list[EditCase]:
    """Read a native case file, refusing it whole if any record is bad (before any editing starts)."""
    cases: list[EditCase] = []
    problems: list[Problem] = []
    for x in iter_validated(path, root):
        (problems if isinstance(x, Problem) else cases).append(x)  # type: ignore[arg-type]
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise BadRecordError(f"{problems[0]}{more}")
    return cases


def read_header(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    why = _header_problem(first, str(path)) if first.strip() else "file is empty (no header line)"
    if why:
        raise BadRecordError(f"{path}:1: {why}")
    return json.loads(first)


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
