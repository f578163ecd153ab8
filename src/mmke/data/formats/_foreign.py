"""What every reader of a foreign benchmark file shares: records, fields, images, problems.

Foreign files (MMEdit, VLKEB, MMKE-Bench, medical MCQ) are JSON lists or JSONL written by
other projects. Nothing in them is trusted: every record is decoded into an ``EditCase`` or
a ``Problem`` that says ``file:line (case id): what is wrong``; image paths must stay inside
their root and the image must decode; strings have a length limit so a hostile file cannot
make tokenisation hang. A reader only maps fields to probes (``Fields`` -> ``EditCase``);
this module turns that into a ``Benchmark`` (refusing it, or skipping bad records with
``skip_bad``) the same way for every format.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mmke.data.benchmark import Benchmark
from mmke.data.checks import (
    MAX_LIST_ITEMS,
    FieldError,
    check_depth,
    check_image_path,
    check_text,
    image_problem,
    json_type,
)
from mmke.data.schema import Problem
from mmke.errors import BadRecordError, ConfigError
from mmke.types import EditCase, ImageRef


@dataclass(frozen=True)
class RawRecord:
    """One decoded JSON value of a file and where it starts (1-based line; index in the file)."""

    index: int
    line: int
    value: Any


# ---------------------------------------------------------------- records


def read_text(path: Path) -> str:
    """The file as text; a missing, unreadable or non-UTF-8 file is a ``BadRecordError``."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadRecordError(f"{path}: cannot read ({e.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise BadRecordError(f"{path}:{line}: file is not UTF-8 text (byte {e.start})") from None


def iter_records(path: Path) -> Iterator[RawRecord]:
    """Each record of a JSON-list file or a JSONL file (chosen by content, not by suffix).

    A file that cannot be parsed at all raises ``BadRecordError`` at the place it breaks:
    records after that point cannot be told apart, so it is never "skipped".
    """
    text = read_text(path)
    start = _skip_ws(text, 0)
    if start == len(text):
        raise BadRecordError(f"{path}: file is empty (expected a JSON list of records)")
    if text[start] == "[":
        yield from _json_list(path, text, start)
    else:
        yield from _json_lines(path, text)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _decode_error(path: Path, text: str, pos: int, e: Exception) -> BadRecordError:
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    what = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
    return BadRecordError(f"{path}:{line}: invalid JSON ({what} at column {col})")


def _json_list(path: Path, text: str, start: int) -> Iterator[RawRecord]:
    decoder = json.JSONDecoder()
    pos, line, counted, index = start + 1, 1, 0, 0
    while True:
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == "]" and index == 0:
            pos += 1
            break
        try:
            value, end = decoder.raw_decode(text, pos)
        except (json.JSONDecodeError, RecursionError) as e:
            at = e.pos if isinstance(e, json.JSONDecodeError) else pos
            raise _decode_error(path, text, at, e) from None
        line += text.count("\n", counted, pos)
        counted = pos
        yield RawRecord(index, line, value)
        index += 1
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos += 1
            continue
        if pos < len(text) and text[pos] == "]":
            pos += 1
            break
        raise _decode_error(path, text, pos, json.JSONDecodeError("expected ',' or ']'", text, pos))
    if _skip_ws(text, pos) != len(text):
        raise _decode_error(path, text, pos, json.JSONDecodeError("extra data after the list", text, pos))


def _json_lines(path: Path, text: str) -> Iterator[RawRecord]:
    index = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadRecordError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise BadRecordError(f"{path}:{lineno}: invalid JSON (nested too deeply)") from None
        yield RawRecord(index, lineno, value)
        index += 1


# ---------------------------------------------------------------- fields


class Fields:
    """Typed access to one record's fields; every failure is a one-line ``FieldError``."""

    def __init__(self, value: Any) -> None:
        if not isinstance(value, dict):
            raise FieldError(f"record must be a JSON object, got {json_type(value)}")
        check_depth(value)
        self.rec: dict[str, Any] = value

    def has(self, *keys: str) -> bool:
        return any(self.rec.get(k) is not None for k in keys)

    def text(self, *keys: str, required: bool = True) -> str | None:
        """The first of ``keys`` present (aliases: both spellings a format uses), a non-empty string."""
        for key in keys:
            if self.rec.get(key) is not None:
                return checked_text(self.rec[key], key)
        if required:
            names = " or ".join(repr(k) for k in keys)
            raise FieldError(f"field {names} missing")
        return None

    def items(self, key: str) -> list[Any]:
        """A list field (absent -> empty)."""
        value = self.rec.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise FieldError(f"field {key!r} must be a list, got {json_type(value)}")
        if len(value) > MAX_LIST_ITEMS:
            raise FieldError(f"field {key!r} has {len(value)} items (limit {MAX_LIST_ITEMS})")
        return value


def checked_text(value: Any, key: str) -> str:
    """``value`` as a usable prompt/answer: a non-empty string within the length limit."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # answers such as 1989 are often stored as numbers
    if not isinstance(value, str):
        raise FieldError(f"field {key!r} must be a string, got {json_type(value)}")
    if not value.strip():
        raise FieldError(f"field {key!r} is empty")
    return check_text(value, key)


# ---------------------------------------------------------------- images


@dataclass
class ImageChecker:
    """Resolves a record's image path under its root and checks that the file decodes (cached).

    ``roots`` maps a role (``image``, ``rephrase``…) to its folder; refs are made relative to
    ``root``, the common folder of all of them, which is what the run's ``ImageStore`` opens.
    Benchmarks reuse images (MMEdit's locality photos), and a path is resolved and decoded
    once per reader, not once per record.
    """

    roots: Mapping[str, Path]
    _seen: dict[tuple[str, str], ImageRef | str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for role, folder in self.roots.items():
            if not Path(folder).is_dir():
                raise ConfigError(f"image root for {role!r} is not a directory: {folder}")
        self._real = {role: Path(os.path.realpath(p)) for role, p in self.roots.items()}
        real = [str(p) for p in self._real.values()]
        self.root = Path(os.path.commonpath(real)) if real else Path(".")

    def ref(self, path: Any, key: str, role: str = "image") -> ImageRef:
        """An ``ImageRef`` (relative to ``root``) for ``path`` found in field ``key``."""
        rel = checked_text(path, key)
        found = self._seen.get((role, rel))
        if found is None:
            found = self._seen[(role, rel)] = self._resolve(rel, self._real[role])
        if isinstance(found, str):
            raise FieldError(f"field {key!r}: {found}")
        return found

    def _resolve(self, rel: str, folder: Path) -> ImageRef | str:
        why = check_image_path(rel, folder) or image_problem(folder / rel)
        return why if why else ImageRef((folder / rel).relative_to(self.root).as_posix())


# ---------------------------------------------------------------- records -> benchmark


#: A reader's record mapping: the record's fields and its generated case id -> one case.
ToCase = Callable[[Fields, str], EditCase]


class LeftOut(Exception):
    """Raised by a reader for a record the benchmark's own loader skips (VLKEB's hop filter, an
    empty answer): neither a case nor a bad record."""


@dataclass(frozen=True)
class Decoded:
    """Every case of a file that decoded, and a Problem for every record that did not."""

    cases: tuple[EditCase, ...]
    problems: tuple[Problem, ...]


def decode_file(path: Path, to_case: ToCase, prefix: str | None = None) -> Decoded:
    """Run ``to_case`` over every record of ``path``; bad records and duplicates become Problems.

    Case ids are ``<prefix>-<index>`` (prefix: the file's stem), since the foreign formats
    carry no ids; a case's meta keeps ``source`` = ``file:line`` so it can be traced back.
    """
    stem = prefix or path.stem
    cases: list[EditCase] = []
    problems: list[Problem] = []
    seen: dict[tuple, int] = {}
    for raw in iter_records(path):
        cid = f"{stem}-{raw.index:05d}"
        try:
            case = to_case(Fields(raw.value), cid)
        except LeftOut:
            continue
        except FieldError as e:
            problems.append(Problem(str(path), raw.line, cid, str(e)))
            continue
        key = (case.edit.prompt, case.edit.target, case.edit.image)
        if key in seen:
            problems.append(Problem(str(path), raw.line, cid, f"duplicate of the record on line {seen[key]}"))
            continue
        seen[key] = raw.line
        cases.append(_with_source(case, f"{path.name}:{raw.line}"))
    return Decoded(tuple(cases), tuple(problems))


def _with_source(case: EditCase, source: str) -> EditCase:
    return replace(case, meta={**case.meta, "source": source})


def refuse(problems: Sequence[Problem], fmt: str) -> BadRecordError:
    """The one-line error for a file with bad records (the default: stop before any editing)."""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    hint = f"; `mmke validate --format {fmt} FILE` lists all, skip_bad=true skips them"
    return BadRecordError(f"{problems[0]}{more}{hint}")


def make_benchmark(
    fmt: str,
    path: Path,
    decoded: Decoded,
    root: Path | None,
    *,
    skip_bad: bool,
    train: Decoded | None = None,
) -> Benchmark:
    """A Benchmark of the decoded cases, refusing bad records unless ``skip_bad``."""
    problems = decoded.problems + (train.problems if train else ())
    if problems and not skip_bad:
        raise refuse(problems, fmt)
    if not decoded.cases and not problems:
        raise BadRecordError(f"{path}: no records")
    return Benchmark(
        name=f"{fmt}:{path.stem}",
        version=f"{fmt}-v1",
        cases=decoded.cases,
        image_root=root,
        train_cases=train.cases if train else (),
        skipped=problems,
    )


def take_options(fmt: str, options: Mapping[str, Any], known: Sequence[str]) -> dict[str, Any]:
    """``options`` after checking every name is one ``fmt`` knows (a one-line ConfigError if not)."""
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            accepted = ", ".join(known) or "none"
            raise ConfigError(f"benchmark {fmt!r} has no option {name!r} (accepted: {accepted}){hint}")
    return dict(options)


def bool_option(options: Mapping[str, Any], name: str, default: bool) -> bool:
    """Reader option ``name`` as a boolean (a one-line ConfigError for anything but true/false)."""
    value = options.get(name, default)
    if isinstance(value, bool):
        return value
    raise ConfigError(f"benchmark option {name}={value!r}: expected true or false")


def benchmark_file(fmt: str, arg: str | None, example: str) -> Path:
    """The file named after ``fmt:``, which must exist."""
    if not arg:
        raise ConfigError(f"benchmark {fmt!r} needs a file: {fmt}:{example}")
    path = Path(arg)
    if not path.is_file():
        raise ConfigError(f"benchmark file {path} not found")
    return path
