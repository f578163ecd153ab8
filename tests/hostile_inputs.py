"""Issue 19's hostile inputs and the harness that classifies what the CLI does with each.

Every input is generated in code from the good fixtures (nothing binary is committed): for every
reader, records that are malformed, truncated, oversized, mis-encoded, escaping their image root
or pointing at corrupt images. ``call_main`` runs ``mmke.cli.main`` in-process under a wall-clock
limit with a strict UTF-8 stdout (as a pipe has); ``Tally`` counts the outcomes.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import traceback
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from PIL import Image

from mmke.cli import main

FIX = Path(__file__).parent / "fixtures" / "formats"
FIX_IMAGES = FIX / "images"
NATIVE_HEADER = {"format": "mmke-cases", "version": 1}
#: An output line longer than this is not a readable one-line error (the field's value was echoed).
MAX_LINE = 2_000
VERDICTS = ("ok", "clear", "traceback", "hang", "wrong")


# ---------------------------------------------------------------- running the CLI


class Hang(BaseException):
    """The per-input wall-clock limit ran out (a BaseException so ``main`` cannot swallow it)."""


@dataclass
class Result:
    code: int | None  # None: it hung
    out: str
    err: str
    escaped: str | None = None  # an exception that got out of main(), with its traceback
    seconds: float = 0.0

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]

    @property
    def out_lines(self) -> list[str]:
        return [line for line in self.out.splitlines() if line.strip()]

    def first_line(self) -> str:
        if self.escaped:
            return self.escaped.strip().splitlines()[-1]
        line = (self.err_lines or self.out_lines or [f"(no output, exit {self.code})"])[0]
        return line if len(line) < 300 else line[:300] + f"… ({len(line):,} chars)"


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise ``Hang`` in the main thread after ``seconds`` (SIGALRM)."""

    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def cli_stderr(err: io.TextIOBase):
    """What a terminal's stderr would show during ``main``: the warnings ``logging.basicConfig`` lets
    through (pytest's own handlers keep main's from being installed), the handlers libraries such as
    transformers bind to the real stderr, and Python warnings."""
    stdio = {sys.stderr, sys.__stderr__, sys.stdout, sys.__stdout__}
    swapped = []
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if type(handler) is logging.StreamHandler and handler.stream in stdio:
                swapped.append((handler, handler.setStream(err)))
    shown = logging.StreamHandler(err)
    shown.setLevel(logging.WARNING)
    shown.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger().addHandler(shown)

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        err.write(warnings.formatwarning(message, category, filename, lineno, line))

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", quiet)  # Python's own defaults hide these
            warnings.showwarning = show
            yield
    finally:
        logging.getLogger().removeHandler(shown)
        for handler, stream in swapped:
            handler.setStream(stream)


def call_main(argv: Sequence[str], limit_s: float = 20) -> Result:
    """``main(argv)`` in this process; stdout is strict UTF-8 like a pipe, stderr backslash-escapes."""
    out_b, err_b = io.BytesIO(), io.BytesIO()
    out = io.TextIOWrapper(out_b, encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(err_b, encoding="utf-8", errors="backslashreplace", write_through=True)
    code: int | None = None
    escaped = None
    start = time.perf_counter()
    try:
        with (
            time_limit(limit_s),
            cli_stderr(err),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            code = main(list(argv))
    except Hang:
        code = None
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # anything that escapes main() is counted
        escaped = traceback.format_exc()
        code = -1
    seconds = time.perf_counter() - start
    return Result(
        code, out_b.getvalue().decode("utf-8", "replace"), err_b.getvalue().decode(), escaped, seconds
    )


@dataclass
class Child:
    """A ``python -m mmke.cli`` child process; its stdout and stderr go to files until ``finish``."""

    proc: subprocess.Popen
    out: IO[bytes]
    err: IO[bytes]
    timeout: float

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None


def run_cli(argv: Sequence[str], cwd: Path, timeout: float = 180) -> Child:
    """``python -m mmke.cli ARGV`` started in ``cwd``, offline (``finish`` waits for it)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "160"}
    tag = time.monotonic_ns()
    out = open(cwd / f"stdout-{tag}.txt", "w+b")  # noqa: SIM115 - closed by finish()
    err = open(cwd / f"stderr-{tag}.txt", "w+b")  # noqa: SIM115
    cmd = [sys.executable, "-m", "mmke.cli", *argv]
    # a child inherits its starter's ignored or blocked signals (whatever the test process or a
    # library in it left behind); it must meet SIGINT as a user's terminal would deliver it
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, preexec_fn=_default_sigint)
    return Child(proc, out, err, timeout)


def _default_sigint() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def finish(child: Child) -> Result:
    """Wait for ``child``; one that runs past its timeout is killed and counts as a hang (code None)."""
    start = time.perf_counter()
    try:
        code: int | None = child.proc.wait(timeout=child.timeout)
    except subprocess.TimeoutExpired:
        child.proc.kill()
        child.proc.wait()
        code = None
    texts = []
    for f in (child.out, child.err):
        f.seek(0)
        texts.append(f.read().decode("utf-8", "backslashreplace"))
        f.close()
    return Result(code, texts[0], texts[1], None, time.perf_counter() - start)


# ---------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class Outcome:
    section: str  # readers, settings, model_folders, process
    category: str  # malformed, truncated, oversized, …
    name: str
    verdict: str  # one of VERDICTS
    detail: str  # the first output line, or why the verdict is not ok/clear
    records_lost: int = 0
    leftovers: int = 0

    @property
    def failed(self) -> bool:
        return self.verdict not in ("ok", "clear") or self.records_lost > 0 or self.leftovers > 0


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)
    sections_run: set[str] = field(default_factory=set)

    def add(self, outcome: Outcome) -> Outcome:
        self.outcomes.append(outcome)
        return outcome

    def of(self, section: str | None = None) -> list[Outcome]:
        return [o for o in self.outcomes if section is None or o.section == section]

    def counts(self, outcomes: Sequence[Outcome] | None = None) -> dict[str, int]:
        outcomes = self.outcomes if outcomes is None else outcomes
        verdicts = Counter(o.verdict for o in outcomes)
        return {
            "inputs": len(outcomes),
            **{v: verdicts.get(v, 0) for v in VERDICTS},
            "records_lost": sum(o.records_lost for o in outcomes),
            "leftovers": sum(o.leftovers for o in outcomes),
        }

    def report(self) -> dict[str, Any]:
        """{totals, per section, per section/category, failures}: what the suite writes as JSON."""
        by_section: dict[str, Any] = {}
        for section in dict.fromkeys(o.section for o in self.outcomes):
            rows = self.of(section)
            cats = dict.fromkeys(o.category for o in rows)
            by_section[section] = {
                **self.counts(rows),
                "categories": {c: self.counts([o for o in rows if o.category == c]) for c in cats},
            }
        return {
            "totals": self.counts(),
            "sections": by_section,
            "failures": [describe(o) for o in self.outcomes if o.failed],
        }

    def failures(self, section: str | None = None) -> list[str]:
        return [describe(o) for o in self.of(section) if o.failed]


def describe(o: Outcome) -> str:
    extra = (f", {o.records_lost} record(s) lost" if o.records_lost else "") + (
        f", {o.leftovers} leftover(s)" if o.leftovers else ""
    )
    return f"[{o.section}/{o.category}] {o.name}: {o.verdict}{extra}: {o.detail}"


def table(report: dict[str, Any]) -> str:
    """The counts as a fixed-width text table (one row per section and category, then totals)."""
    cols = ("inputs", *VERDICTS, "records_lost", "leftovers")
    head = f"{'section / category':<34}" + "".join(f"{c:>13}" for c in cols)
    lines = [head, "-" * len(head)]
    for section, data in report["sections"].items():
        lines.append(f"{section:<34}" + "".join(f"{data[c]:>13}" for c in cols))
        for cat, counts in data["categories"].items():
            lines.append(f"{'  ' + cat:<34}" + "".join(f"{counts[c]:>13}" for c in cols))
    lines.append("-" * len(head))
    lines.append(f"{'total':<34}" + "".join(f"{report['totals'][c]:>13}" for c in cols))
    return "\n".join(lines)


def broken(res: Result) -> str | None:
    """``traceback`` / ``hang`` when the CLI did either, else None."""
    if res.code is None:
        return "hang"
    text = res.out + res.err
    if res.escaped or res.code == 70 or "Traceback" in text or "mmke: internal error" in text:
        return "traceback"
    return None


def one_line_error(res: Result) -> str | None:
    """Why ``res`` is not the contract's refusal (exit 2, one ``mmke: error:`` line), else None."""
    if res.code != 2:
        return f"exit {res.code}, expected 2"
    lines = res.err_lines
    if len(lines) != 1 or not lines[0].startswith("mmke: error: "):
        return f"stderr is {len(lines)} line(s), expected one 'mmke: error:' line: {lines[:3]!r}"
    if len(lines[0]) > MAX_LINE:
        return f"the error line is {len(lines[0]):,} characters long"
    return None


# ---------------------------------------------------------------- the readers' good files


@dataclass
class Reader:
    """One reader's good file, as records, and where in record 0 each kind of field lives."""

    fmt: str
    filename: str
    records: list[Any]
    text: tuple[str, ...]  # a required prompt
    answer: tuple[str, ...]  # a required answer
    image: tuple[str, ...]  # a required image path
    items: tuple[str, ...] | None  # a list of probes (None: the format has none)
    item: Any  # one good element of that list

    def dump(self, records: Sequence[Any]) -> str:
        """The file's text: native is a header line and JSONL, the others a JSON list (one record a line)."""
        lines = [json.dumps(r, ensure_ascii=False) for r in records]
        if self.fmt == "native":
            return "\n".join([json.dumps(NATIVE_HEADER), *lines]) + "\n"
        return "[\n" + ",\n".join(lines) + "\n]\n"

    @property
    def good(self) -> int:
        return len(self.records)


def readers(native_file: Path) -> list[Reader]:
    """Every reader with a good file (``native_file`` is written here from the foreign fixtures)."""
    from mmke.data.benchmark import load_benchmark
    from mmke.data.schema import case_to_json, write_cases

    cases = [
        *load_benchmark(f"vlkeb:{FIX / 'vlkeb/eval_multihop.json'}", FIX_IMAGES).cases,
        *load_benchmark(f"mmedit:{FIX / 'mmedit/vqa_eval.json'}", FIX_IMAGES).cases,
    ]
    write_cases(native_file, cases)
    native = [case_to_json(c) for c in cases]
    load = lambda name: json.loads((FIX / name).read_text(encoding="utf-8"))  # noqa: E731
    medmcq = load("medmcq/medmcq_eval.json")
    # every record names its counterfactual, so no embedding model is needed to read the file
    for rec, letter in zip(medmcq, ("D", "A", None, "B"), strict=True):
        if letter:
            rec["counterfactual"] = letter
    port = {"port_type": "1-hop", "Q&A": {"Question": "Where is it?", "Answer": "London"}}
    locality = {"question": "What is the normal heart rate?", "answer": "60 to 100"}
    foreign = ("src",), ("alt",), ("image",)
    return [
        Reader("native", "cases.jsonl", native, ("edit", "prompt"), ("edit", "target"), ("edit", "image"),
               ("probes",), native[0]["probes"][0]),
        Reader("mmedit", "vqa_eval.json", load("mmedit/vqa_eval.json"), *foreign, None, "a rephrase"),
        Reader("vlkeb", "eval_multihop.json", load("vlkeb/eval_multihop.json"), *foreign, ("port_new",),
               port),
        Reader("mmke_bench", "entity_eval.json", load("mmke_bench/entity_eval.json"), *foreign, ("port_new",),
               port),
        Reader("medmcq", "medmcq_eval.json", medmcq, ("question",), ("answer",), ("image",), ("locality",),
               locality),
    ]  # fmt: skip


# ---------------------------------------------------------------- hostile image files


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def claim_png(width: int, height: int) -> bytes:
    """A few hundred bytes whose IHDR claims ``width x height`` pixels (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _noise(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)).save(buf, fmt)
    return buf.getvalue()


def image_root(tmp: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the fixture images plus ``hostile/…`` files; returns (root, name -> path in the root)."""
    root = tmp / "images"
    shutil.copytree(FIX_IMAGES, root)
    bad = root / "hostile"
    bad.mkdir()
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes((FIX_IMAGES / "m.0abc12/google_3.jpg").read_bytes())
    png, jpg = _noise("PNG"), _noise("JPEG")
    flipped = bytearray(png)
    mid = len(flipped) // 2
    flipped[mid : mid + 64] = bytes(b ^ 0xFF for b in flipped[mid : mid + 64])
    files = {
        "zero.jpg": b"",
        "trunc.png": png[: len(png) // 2],
        "trunc.jpg": jpg[: len(jpg) // 2],
        "header_only.png": png[:40],
        "text.jpg": b"this is a text file, not a picture\n",
        "html.png": b"<html><body>404 Not Found</body></html>",
        "gif_garbage.gif": b"GIF89a not really a gif",
        "flipped.png": bytes(flipped),
        "bomb.png": claim_png(20_000, 20_000),
        "big_claim.png": claim_png(9_000, 9_000),
        "wide_claim.png": claim_png(2**31 - 1, 1),
        "png_named.jpg": png,  # a good picture with the wrong suffix: fine
    }
    for name, data in files.items():
        (bad / name).write_bytes(data)
    (bad / "dir.jpg").mkdir()
    os.symlink(outside / "secret.jpg", bad / "link.jpg")
    os.symlink(outside, bad / "linkdir")
    os.symlink(bad / "loop.jpg", bad / "loop.jpg")
    os.symlink("/dev/zero", bad / "dev_zero.jpg")
    os.mkfifo(bad / "fifo.jpg")
    refs = {name: f"hostile/{name}" for name in [*files, "dir.jpg", "link.jpg", "loop.jpg", "dev_zero.jpg",
                                                  "fifo.jpg"]}  # fmt: skip
    refs["linkdir"] = "hostile/linkdir/secret.jpg"
    return root, refs


# ---------------------------------------------------------------- mutations


@dataclass(frozen=True)
class Hostile:
    """One hostile (or, with ``expect='ok'``, legitimately odd) version of a reader's good file."""

    category: str
    name: str
    data: bytes
    expect: str = "bad"  # "bad": refused; "ok": accepted as the good file
    good: int | None = None  # good cases a record-local problem must leave (None: not checked)
    options: tuple[str, ...] = ()
    names: str | None = None  # the file the first problem line must name (default: the file itself)


def _set(rec: dict, path: Sequence[str], value: Any) -> dict:
    node = rec
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return rec


def _get(rec: Any, path: Sequence[str]) -> Any:
    for key in path:
        rec = rec[key]
    return rec


def _del(rec: dict, path: Sequence[str]) -> dict:
    node = rec
    for key in path[:-1]:
        node = node[key]
    node.pop(path[-1], None)
    return rec


def _nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = [value]
    return value


def mutations(r: Reader, refs: dict[str, str]) -> list[Hostile]:
    """Every hostile version of ``r``'s good file (each a few KB, except the oversized ones)."""
    h, local = Hostile, r.good - 1  # a bad record 0 must leave every other record good

    def enc(text: str) -> bytes:  # a lone surrogate (only in a mutation) is written as its escape
        return text.encode("utf-8", "backslashreplace")

    def rec0(change: Callable[[dict], Any], dup: bool = False) -> bytes:
        """The file with record 0 changed in place (``change`` returns it) or replaced (returns another)."""
        records = json.loads(json.dumps(r.records))
        records[0] = change(records[0])
        return enc(r.dump(records + ([records[0]] if dup else [])))

    def at(path: Sequence[str], value: Any) -> bytes:
        return rec0(lambda rec: _set(rec, path, value))

    def image(path: str) -> bytes:
        return at(r.image, path)

    def raw0(text: str) -> bytes:
        """The file with record 0 replaced by ``text`` as is (invalid JSON, raw bytes)."""
        return enc(r.dump(["@@0@@", *r.records[1:]]).replace('"@@0@@"', text))

    base = enc(r.dump(r.records))
    text0 = json.dumps(r.records[0], ensure_ascii=False)
    prompt = _get(r.records[0], r.text)
    before0 = len(enc(r.dump(["@@0@@"])).split(b'"@@0@@"')[0])  # where record 0 starts in the file
    latin1 = raw0(text0).replace(enc(prompt), enc(prompt) + "é".encode("latin-1"), 1)
    items = r.items or ("rephrase",)  # MMEdit has no list field: a list where a string belongs
    out = [
        # --- expected to be accepted: the good file, and harmless variations of it
        h("baseline", "good_file", base, "ok", r.good),
        h("mis-encoded", "utf8_bom", b"\xef\xbb\xbf" + base, "ok", r.good),
        h("mis-encoded", "crlf_line_ends", base.replace(b"\n", b"\r\n"), "ok", r.good),
        h("mis-encoded", "unicode_text", at(r.text, "Qué es esto? 🚌 مرحبا ‮"), "ok", r.good),
        h("corrupt-image", "png_named_jpg", image(refs["png_named.jpg"]), "ok", r.good),
        # --- malformed
        h("malformed", "record_is_string", rec0(lambda x: "just a string"), good=local),
        h("malformed", "record_is_list", rec0(lambda x: [1, 2, 3]), good=local),
        h("malformed", "record_is_null", rec0(lambda x: None), good=local),
        h("malformed", "record_is_number", rec0(lambda x: 42), good=local),
        h("malformed", "record_is_empty_object", rec0(lambda x: {}), good=local),
        h("malformed", "prompt_is_object", at(r.text, {"a": 1}), good=local),
        h("malformed", "prompt_is_list", at(r.text, ["a", "b"]), good=local),
        h("malformed", "prompt_is_bool", at(r.text, True), good=local),
        h("malformed", "prompt_missing", rec0(lambda x: _del(x, r.text)), good=local),
        h("malformed", "prompt_empty", at(r.text, "   "), good=local),
        h("malformed", "answer_missing", rec0(lambda x: _del(x, r.answer)), good=local),
        h("malformed", "answer_is_object", at(r.answer, {"x": "y"}), good=local),
        h("malformed", "image_is_number", at(r.image, 7), good=local),
        h("malformed", "image_is_list", at(r.image, ["a.jpg"]), good=local),
        h("malformed", "list_item_is_number", at(items, [5]), good=local),
        h("malformed", "duplicate_record", rec0(lambda x: x, dup=True), good=r.good),
        h("malformed", "invalid_json_in_record", raw0('{"src": "a", "alt": }')),
        h("malformed", "unquoted_key", raw0("{src: 1}")),
        h("malformed", "trailing_garbage", base + b"}}} garbage"),
        h("malformed", "empty_file", b""),
        h("malformed", "whitespace_only", b"  \n\n\t\n"),
        h("malformed", "no_records", enc(r.dump([]))),
        h("malformed", "json_object_not_list", enc(json.dumps({"records": r.records}))),
        h("malformed", "bare_string_file", b'"hello"'),
        h("malformed", "binary_garbage", bytes(range(256)) * 8),
        h("malformed", "unknown_reader_option", base, options=("hops=2",)),
        h("malformed", "missing_train_file", base, options=("train=/nope/t.json",), names="/nope/t.json"),
        # --- truncated
        h("truncated", "cut_mid_record", base[: len(base) * 2 // 3]),
        h("truncated", "cut_after_first_byte", base[:1]),
        h("truncated", "cut_mid_utf8_char", base[: len(base) // 2] + "é".encode()[:1]),
        h("truncated", "cut_mid_string", raw0(text0)[: before0 + 20]),
        h("truncated", "image_cut_png", image(refs["trunc.png"]), good=local),
        h("truncated", "image_cut_jpeg", image(refs["trunc.jpg"]), good=local),
        h("truncated", "image_png_header_only", image(refs["header_only.png"]), good=local),
        # --- oversized
        h("oversized", "prompt_1mb", at(r.text, "x" * 1_000_000), good=local),
        h("oversized", "answer_1mb", at(r.answer, "y " * 500_000), good=local),
        h("oversized", "list_5000_items", at(items, [r.item] * 5_000), good=local),
        h("oversized", "image_bomb_20000x20000", image(refs["bomb.png"]), good=local),
        h("oversized", "image_claims_9000x9000", image(refs["big_claim.png"]), good=local),
        h("oversized", "image_claims_2^31x1", image(refs["wide_claim.png"]), good=local),
        # --- mis-encoded
        h("mis-encoded", "latin1_byte", latin1),
        h("mis-encoded", "utf16_le_with_bom", r.dump(r.records).encode("utf-16")),
        h("mis-encoded", "utf16_be_no_bom", r.dump(r.records).encode("utf-16-be")),
        h("mis-encoded", "utf32", r.dump(r.records).encode("utf-32")),
        h("mis-encoded", "raw_nul_in_string", raw0(text0.replace(prompt, prompt + "\x00", 1))),
        h("mis-encoded", "raw_nul_between_records", base.replace(b"\n", b"\n\x00", 2)),
        h("mis-encoded", "overlong_utf8", raw0(text0).replace(enc(prompt), b"\xc0\xaf" + enc(prompt), 1)),
        h("mis-encoded", "lone_surrogate_prompt", at(r.text, "what is \ud800 ?"), good=local),
        h("mis-encoded", "lone_surrogate_image", image("val2014/\ud800.jpg"), good=local),
        # --- escaping the image root
        h("escaping", "absolute_path", image("/etc/passwd"), good=local),
        h("escaping", "dotdot_path", image("../outside/secret.jpg"), good=local),
        h("escaping", "dotdot_inside", image("val2014/../../outside/secret.jpg"), good=local),
        h("escaping", "symlink_out_of_root", image(refs["link.jpg"]), good=local),
        h("escaping", "symlinked_dir_out_of_root", image(refs["linkdir"]), good=local),
        h("escaping", "symlink_to_dev_zero", image(refs["dev_zero.jpg"]), good=local),
        h("escaping", "symlink_loop", image(refs["loop.jpg"]), good=local),
        h("escaping", "backslash_path", image("val2014\\COCO_val2014_000000000001.jpg"), good=local),
        h("escaping", "windows_drive", image("C:/Windows/win.ini"), good=local),
        h("escaping", "unc_path", image("//server/share/x.jpg"), good=local),
        h("escaping", "nul_in_path", image("val2014/a\u0000.jpg"), good=local),
        h("escaping", "empty_path", image(""), good=local),
        h("escaping", "path_is_a_directory", image(refs["dir.jpg"]), good=local),
        h("escaping", "path_is_a_fifo", image(refs["fifo.jpg"]), good=local),
        h("escaping", "file_name_too_long", image("a" * 300 + ".jpg"), good=local),
        h("escaping", "path_too_long", image("a/" * 3000 + "x.jpg"), good=local),
        h("escaping", "missing_image", image("val2014/missing.jpg"), good=local),
        h("escaping", "url_as_path", image("http://example.com/a.jpg"), good=local),
        # --- corrupt images
        h("corrupt-image", "zero_bytes", image(refs["zero.jpg"]), good=local),
        h("corrupt-image", "text_named_jpg", image(refs["text.jpg"]), good=local),
        h("corrupt-image", "html_named_png", image(refs["html.png"]), good=local),
        h("corrupt-image", "gif_garbage", image(refs["gif_garbage.gif"]), good=local),
        h("corrupt-image", "flipped_png_data", image(refs["flipped.png"]), good=local),
        # --- deep nesting
        h("deep-nesting", "100000_open_brackets", b"[" * 100_000),
        h("deep-nesting", "100000_balanced_brackets", b"[" * 100_000 + b"]" * 100_000),
        h("deep-nesting", "100000_open_objects", b'{"a":' * 100_000),
        h("deep-nesting", "record_100000_deep", raw0("[" * 100_000 + "]" * 100_000)),
        h("deep-nesting", "field_40_deep", at(r.text, _nested(40)), good=local),
        h("deep-nesting", "extra_key_40_deep", rec0(lambda x: {**x, "extra": _nested(40)}), good=local),
    ]
    if r.items:
        out.append(h("malformed", "list_field_is_string", at(items, "not a list"), good=local))
    return out + _own_mutations(r, at, rec0, base)


def _own_mutations(r: Reader, at: Callable, rec0: Callable, base: bytes) -> list[Hostile]:
    """The inputs only one reader's format can have (the native header, MCQ options, hop entries)."""
    h, local = Hostile, r.good - 1
    if r.fmt == "native":
        lines = r.dump(r.records).split("\n", 1)[1]

        def header(value: Any) -> bytes:
            return (json.dumps(value) + "\n" + lines).encode()

        probe = r.item
        return [
            h("malformed", "only_header", (json.dumps(NATIVE_HEADER) + "\n").encode()),
            h("malformed", "no_header", lines.encode()),
            h("malformed", "header_wrong_format", header({"format": "other", "version": 1})),
            h("malformed", "header_version_99", header({"format": "mmke-cases", "version": 99})),
            h("malformed", "header_is_list", header([1, 2])),
            h("malformed", "header_deep", header({**NATIVE_HEADER, "x": _nested(40)})),
            h("malformed", "duplicate_id", at(("id",), r.records[1]["id"]), good=local),
            h("malformed", "id_is_number", at(("id",), 7), good=local),
            h("malformed", "probe_kind_unknown", at(("probes",), [{**probe, "kind": "x"}]), good=local),
            h("malformed", "edit_type_unknown", at(("edit_type",), "nope"), good=local),
            h("malformed", "hop_is_a_string", at(("probes",), [{**probe, "hop": "1"}]), good=local),
            h("malformed", "meta_not_strings", at(("meta",), {"a": [1]}), good=local),
            h("oversized", "id_1mb", at(("id",), "i" * 1_000_000), good=local),
            h("oversized", "meta_1mb", at(("meta",), {"a": "m" * 1_000_000}), good=local),
            h("oversized", "options_5000", at(("edit", "options"), ["o"] * 5_000), good=local),
            h("mis-encoded", "lone_surrogate_id", at(("id",), "case-\ud800"), good=local),
        ]
    if r.fmt == "medmcq":
        return [
            h("malformed", "answer_not_an_option", at(("answer",), "Z"), good=local),
            h("malformed", "options_twice", rec0(lambda x: {**x, "A": "again"}), good=local),
            h("malformed", "counterfactual_is_answer", at(("counterfactual",), "A"), good=local),
            h("oversized", "option_1mb", at(("options", "B"), "b" * 1_000_000), good=local),
        ]
    out = []
    if r.fmt in ("vlkeb", "mmke_bench"):
        out = [
            h(
                "malformed",
                "port_type_9_hop",
                at(("port_new",), [{"port_type": "9-hop", "Q&A": {}}]),
                good=local,
            ),
            h(
                "malformed",
                "port_qa_not_object",
                at(("port_new",), [{"port_type": "1-hop", "Q&A": "x"}]),
                good=local,
            ),
        ]
    if r.fmt == "vlkeb":
        out += [
            h("malformed", "hop_option_7", base, options=("hop=7",)),
            h("malformed", "hop_option_not_yaml", base, options=("hop=[1",)),
        ]
    return out


def classify_validate(res: Result, hostile: Hostile, file: Path) -> tuple[str, str, int]:
    """(verdict, detail, records lost) for ``mmke validate`` on one hostile file."""
    bad = broken(res)
    if bad:
        return bad, (res.escaped or res.first_line()).strip().splitlines()[-1], 0
    long = [line for line in res.out_lines + res.err_lines if len(line) > MAX_LINE]
    if long:
        return "wrong", f"an output line is {len(long[0]):,} characters long: {long[0][:120]}…", 0
    if hostile.expect == "ok":
        if res.code == 0 and f"ok ({hostile.good} cases)" in res.out:
            return "ok", res.first_line(), 0
        lost = hostile.good - _good_cases(res) if res.code == 1 else 0
        return "wrong", f"a good file was refused (exit {res.code}): {res.first_line()}", max(lost, 0)
    if res.code == 0:
        return "wrong", f"accepted silently (exit 0): {res.first_line()}", 0
    if res.code == 2:
        why = one_line_error(res)
        if not why and hostile.good is not None:  # validate lists bad records; it does not stop at one
            why = f"one bad record stopped the whole file, its {hostile.good} good case(s) unread"
        return ("wrong", f"{why}: {res.first_line()}", 0) if why else ("clear", res.first_line(), 0)
    if res.code != 1:
        return "wrong", f"exit {res.code}: {res.first_line()}", 0
    if res.err_lines:
        return "wrong", f"exit 1 with stderr: {res.err_lines[0][:200]}", 0
    named = hostile.names or str(file)
    if not res.out_lines or not res.out_lines[0].startswith(f"{named}:"):
        return "wrong", f"the first problem line does not name {named}:LINE: {res.first_line()}", 0
    lost = 0 if hostile.good is None else max(hostile.good - _good_cases(res), 0)
    return "clear", res.first_line(), lost


def _good_cases(res: Result) -> int:
    found = re.search(r"(\d+) good case\(s\)", " ".join(res.out.split()))
    return int(found.group(1)) if found else 0
