"""What every benchmark reader checks before a record becomes a case: text, nesting, sizes, images.

The native reader and the foreign readers (MMEdit, VLKEB, MMKE-Bench, medical MCQ) share these,
so a file that one of them refuses is refused by all for the same reason, in the same words.
Nothing in a benchmark file is trusted: a path must stay inside its data root, an image must
decode within a pixel budget, a string must fit the length cap (so tokenisation cannot hang)
and a record must not nest deeper than a benchmark record ever does.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image, UnidentifiedImageError

#: Longest string a record may hold. Real prompts and answers are far shorter (MMKE-Bench's
#: longest descriptions are ~2k characters); a longer one is a broken or hostile record.
MAX_FIELD_CHARS = 16_384
#: A probe list longer than this in one record is not a benchmark record either.
MAX_LIST_ITEMS = 1_000
#: Largest image a record may point to (width x height). Benchmark photos and scans are a few
#: megapixels; 64 MP (8000 x 8000) leaves room for large scans while a decompression bomb
#: (a small file that expands to gigabytes of pixels) is refused before it is decoded.
MAX_IMAGE_PIXELS = 64_000_000
#: The deepest JSON nesting a record may have (native records nest four levels). Deeper input
#: is refused by a walk over the decoded value, and input deep enough to exhaust Python's
#: recursion while decoding is caught as the same problem.
MAX_DEPTH = 32


class FieldError(Exception):
    """A problem with one field of one record (becomes a ``Problem`` with the record's place)."""


# ---------------------------------------------------------------- text and JSON


def utf8_lines(data: bytes) -> Iterator[tuple[int, str | None]]:
    """``(line number, text)`` of each line of ``data``; ``text`` is None for a line that is not UTF-8.

    A byte-order mark at the start is dropped. Decoding line by line lets one bad line be one
    bad record instead of the whole file being unreadable.
    """
    data = data.removeprefix(b"\xef\xbb\xbf")
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            yield lineno, raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            yield lineno, None


def loads_record(text: str) -> Any:
    """One JSON value, refused (``json.JSONDecodeError`` or ``FieldError``) when it nests too deeply."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise FieldError(f"invalid JSON (nested deeper than {MAX_DEPTH} levels)") from None
    check_depth(value)
    return value


def check_depth(value: Any) -> None:
    """``FieldError`` when ``value`` nests deeper than ``MAX_DEPTH`` (an iterative walk: no recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise FieldError(f"invalid JSON (nested deeper than {MAX_DEPTH} levels)")
        if isinstance(node, dict):
            stack += [(v, depth + 1) for v in node.values()]
        elif isinstance(node, list):
            stack += [(v, depth + 1) for v in node]


def check_text(value: str, key: str) -> str:
    """``value`` when it fits ``MAX_FIELD_CHARS`` and is real text; a ``FieldError`` naming the field.

    JSON can spell a lone surrogate (``"\\ud800"``), which no tokenizer or UTF-8 file accepts.
    """
    if len(value) > MAX_FIELD_CHARS:
        raise FieldError(f"field {key!r} is {len(value):,} characters long (limit {MAX_FIELD_CHARS:,})")
    if not _encodable(value):
        raise FieldError(f"field {key!r} holds a lone surrogate (\\ud800-\\udfff), which is not text")
    return value


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def clip(value: str, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters, so a message about a huge value stays one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


# ---------------------------------------------------------------- images


def image_problem(file: Path) -> str | None:
    """Why ``file`` is not a usable image (None when it decodes completely within the pixel budget).

    A reader only needs the verdict: the decoded pixels are dropped, never converted.
    """
    try:
        with _decoded(file):
            pass
    except FieldError as e:
        return str(e)
    return None


def decode_image(file: Path) -> Image.Image:
    """``file`` fully decoded as RGB; a ``FieldError`` if it is empty, corrupt, truncated or too large."""
    with _decoded(file) as im:
        return im.convert("RGB")


@contextmanager
def _decoded(file: Path) -> Iterator[Image.Image]:
    """``file`` opened and fully decoded within the pixel budget; every way it can fail is a FieldError."""
    try:
        if file.stat().st_size == 0:
            raise FieldError(f"image {file.name!r} is empty (0 bytes)")
        with warnings.catch_warnings():
            # PIL warns above its own, looser limit; ours is checked below before any decoding
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(file) as im:
                width, height = im.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise FieldError(_too_large(file, width, height))
                im.load()  # a full decode: truncated files fail here, before any editing starts
                yield im
    except Image.DecompressionBombError:
        why = "is too large to decode safely (a decompression bomb?)"
        raise FieldError(f"image {file.name!r} {why}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise FieldError(f"image {file.name!r} is corrupt or truncated ({type(e).__name__})") from None


def _too_large(file: Path, width: int, height: int) -> str:
    return (
        f"image {file.name!r} is {width}x{height} pixels, over the limit of {MAX_IMAGE_PIXELS:,} "
        "(downscale it)"
    )


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
    With ``decode``, each picture must also decode (``image_problem``), once per path.
    """

    def __init__(self, root: Path | None, *, decode: bool = False) -> None:
        self.root = root
        self.decode = decode
        self._root_real = None if root is None else Path(os.path.realpath(root))
        self._seen: dict[str, str | None] = {}

    def __call__(self, path: str) -> str | None:
        if path not in self._seen:
            self._seen[path] = self._check(path)
        return self._seen[path]

    def _check(self, path: str) -> str | None:
        if not path:
            return "image path is empty"
        shown = clip(path)
        if not _encodable(path):
            return f"image path {shown} holds a lone surrogate, which no file name can"
        if "\\" in path or "\x00" in path or (len(path) > 1 and path[1] == ":"):
            return f"image path {shown} is not a relative POSIX path"
        pure = PurePosixPath(path)
        if pure.is_absolute():
            return f"image path {shown} is absolute; paths must be relative to the data root"
        if ".." in pure.parts:
            return f"image path {shown} escapes the data root"
        if self._root_real is None:
            return None
        try:  # a name too long for the file system is this record's problem, not the whole file's
            real = Path(os.path.realpath(self._root_real / pure))
            if not real.is_relative_to(self._root_real):
                return f"image path {shown} resolves outside the data root (symlink?)"
            if not real.is_file():
                return f"image {shown} not found under {self.root}"
        except OSError as e:
            return f"image path {shown} cannot be opened ({e.strerror})"
        return image_problem(real) if self.decode else None
