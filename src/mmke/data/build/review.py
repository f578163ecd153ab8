"""Human review of generated benchmark items: the files a review lives in, a self-contained HTML page to
accept, reject or edit each item, and a small loopback server that saves each decision as it is made."""

from __future__ import annotations

import contextlib
import errno
import html
import json
import logging
import re
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath, PureWindowsPath
from types import TracebackType
from urllib.parse import quote, unquote

from mmke.errors import BadRecordError, ConfigError
from mmke.io import write_atomic

log = logging.getLogger(__name__)

ITEMS_FILE = "review_items.jsonl"
DECISIONS_FILE = "review_decisions.json"
PAGE_FILE = "review.html"
DECISIONS_FORMAT = "mmke-review"
DECISIONS_VERSION = 1
STATUSES = ("accepted", "rejected", "edited")

_ITEM_KEYS = frozenset({"id", "step", "fields", "images"})
_DECISION_KEYS = frozenset({"status", "fields"})
_POST_KEYS = frozenset({"id", "status", "fields"})
_IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
}
_MAX_POST_BYTES = 1 << 20
_MAX_PORT = 65535
_MAX_ERROR_CHARS = 300  # a 400's message is one short line, however large the body it answers
#: a client that closed its end mid-request or mid-response, or stalled past the handler's timeout
_CLIENT_GONE = (ConnectionError, TimeoutError)

#: Debian's Chromium, headless and offline (no background connections on a closed network): how
#: the page's browser test and ``docs/make_review_screenshot.py`` open it with Playwright.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class ReviewItem:
    """One generated item a person checks: `fields` are the texts, `images` paths relative to the review
    directory (POSIX separators)."""

    id: str
    step: str
    fields: dict[str, str]
    images: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    """A reviewer's verdict on one item; only an "edited" decision carries (the edited) field values."""

    status: str
    fields: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problem = _decision_problem(self.status, self.fields)
        if problem:
            raise BadRecordError(problem)


def _decision_problem(status: object, fields: object) -> str | None:
    """Why (status, fields) is not a valid decision, or None."""
    if status not in STATUSES:
        return f"status {_clip(status)} is not one of {', '.join(STATUSES)}"
    if not _is_str_dict(fields):
        return "'fields' must map field names to strings"
    if status == "edited" and not fields:
        return "an 'edited' decision needs the edited field values in 'fields'"
    if status != "edited" and fields:
        return f"a {status!r} decision carries no 'fields' (only 'edited' does)"
    return None


def _is_str_dict(value: object) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )


def _clip(value: object, limit: int = 40) -> str:
    """`value` for a one-line message: a string or number as its repr cut to `limit` characters, anything
    else by its type (a POSTed body may hold megabytes or deep nesting)."""
    if value is None or isinstance(value, (str, int, float)):
        text = repr(value)
        return text if len(text) <= limit else text[: limit - 1] + "…"
    return f"a {type(value).__name__}"


# ---------------------------------------------------------------------------------------------- items


def _image_problem(root: Path, image: str) -> str | None:
    """Why `image` is not a path inside the (resolved) review directory `root`, or None."""
    if not image or "\\" in image or "\x00" in image:
        return f"image path {image!r} must be a non-empty POSIX path (forward slashes)"
    pure = PurePosixPath(image)
    if pure.is_absolute() or PureWindowsPath(image).drive:
        return f"image path {image!r} is absolute; give it relative to the review directory"
    if ".." in pure.parts:
        return f"image path {image!r} leaves the review directory ('..')"
    # a symlink inside the directory may still point outside it
    if not (root / pure).resolve().is_relative_to(root):
        return f"image path {image!r} resolves outside the review directory (a symlink?)"
    return None


def _parse_item(obj: object, root: Path) -> ReviewItem:
    """One items-file record as a ReviewItem; a BadRecordError says what is wrong (without where)."""
    if not isinstance(obj, dict):
        raise BadRecordError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _ITEM_KEYS)
    if unknown:
        raise BadRecordError(f"unknown keys {unknown}; an item has {sorted(_ITEM_KEYS)}")
    item_id, step, fields = obj.get("id"), obj.get("step"), obj.get("fields")
    images = obj.get("images", [])
    if not isinstance(item_id, str) or not item_id:
        raise BadRecordError("'id' must be a non-empty string")
    if not isinstance(step, str) or not step:
        raise BadRecordError("'step' must be a non-empty string")
    if not _is_str_dict(fields):
        raise BadRecordError("'fields' must map field names to strings")
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise BadRecordError("'images' must be a list of path strings")
    for image in images:
        problem = _image_problem(root, image)
        if problem:
            raise BadRecordError(problem)
    return ReviewItem(item_id, step, dict(fields), tuple(images))


def _where(path: Path, line: int, obj: object) -> str:
    """'file line N (item 'x')' for error messages; the id only when the record has a usable one."""
    item_id = obj.get("id") if isinstance(obj, dict) else None
    return f"{path} line {line}" + (f" (item {item_id!r})" if isinstance(item_id, str) else "")


def read_items(directory: Path) -> list[ReviewItem]:
    """The items of a review directory, every line validated; blank lines are skipped."""
    directory = Path(directory)
    path = directory / ITEMS_FILE
    if not path.is_file():
        raise ConfigError(f"{directory} is not a review directory: {ITEMS_FILE} is missing")
    root = directory.resolve()
    items: list[ReviewItem] = []
    first_line: dict[str, int] = {}
    # split on "\n" only: splitlines() would also break inside strings holding U+2028 and friends
    for number, text in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadRecordError(
                f"{path} line {number}: not valid JSON ({e.msg}, column {e.colno})"
            ) from None
        try:
            item = _parse_item(obj, root)
        except BadRecordError as e:
            raise BadRecordError(f"{_where(path, number, obj)}: {e}") from None
        if item.id in first_line:
            raise BadRecordError(
                f"{_where(path, number, obj)}: duplicate id, first used on line {first_line[item.id]}"
            )
        first_line[item.id] = number
        items.append(item)
    return items


def write_items(directory: Path, items: Iterable[ReviewItem]) -> Path:
    """Write `items` to DIR/review_items.jsonl (creating DIR), checked as read_items would check them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    root = directory.resolve()
    lines: list[str] = []
    seen: set[str] = set()
    for item in items:
        record = {"id": item.id, "step": item.step, "fields": item.fields, "images": list(item.images)}
        try:
            _parse_item(record, root)
        except BadRecordError as e:
            raise BadRecordError(f"item {item.id!r} for {directory / ITEMS_FILE}: {e}") from None
        if item.id in seen:
            raise BadRecordError(f"item {item.id!r} for {directory / ITEMS_FILE}: duplicate id")
        seen.add(item.id)
        lines.append(json.dumps(record, ensure_ascii=False))
    path = directory / ITEMS_FILE
    write_atomic(path, "".join(line + "\n" for line in lines))
    return path


# ------------------------------------------------------------------------------------------ decisions


def _parse_decision(obj: object) -> Decision:
    """One {"status", "fields"} record as a Decision; a BadRecordError says what is wrong."""
    if not isinstance(obj, dict):
        raise BadRecordError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _DECISION_KEYS)
    if unknown:
        raise BadRecordError(f"unknown keys {unknown}; a decision has {sorted(_DECISION_KEYS)}")
    status, fields = obj.get("status"), obj.get("fields", {})
    problem = _decision_problem(status, fields)
    if problem:
        raise BadRecordError(problem)
    return Decision(str(status), dict(fields))


def _decisions_json(decisions: Mapping[str, Decision]) -> dict[str, object]:
    """The decisions file's document (the same shape the static page downloads)."""
    return {
        "format": DECISIONS_FORMAT,
        "version": DECISIONS_VERSION,
        "decisions": {k: {"status": d.status, "fields": d.fields} for k, d in decisions.items()},
    }


def read_decisions(directory: Path) -> dict[str, Decision]:
    """The saved decisions of a review directory by item id; none yet (no file) is an empty dict."""
    path = Path(directory) / DECISIONS_FILE
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRecordError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != DECISIONS_FORMAT:
        raise BadRecordError(f"{path}: not a review decisions file (expected format {DECISIONS_FORMAT!r})")
    if doc.get("version") != DECISIONS_VERSION:
        raise BadRecordError(f"{path}: version {doc.get('version')!r}, this mmke reads {DECISIONS_VERSION}")
    raw = doc.get("decisions")
    if not isinstance(raw, dict):
        raise BadRecordError(f"{path}: 'decisions' must map item ids to decisions")
    decisions: dict[str, Decision] = {}
    for item_id, obj in raw.items():
        try:
            decisions[item_id] = _parse_decision(obj)
        except BadRecordError as e:
            raise BadRecordError(f"{path} item {item_id!r}: {e}") from None
    return decisions


def save_decisions(directory: Path, decisions: Mapping[str, Decision]) -> Path:
    """Write DIR/review_decisions.json atomically (a reader never sees half a file)."""
    path = Path(directory) / DECISIONS_FILE
    text = json.dumps(_decisions_json(decisions), sort_keys=True, indent=1, ensure_ascii=False)
    write_atomic(path, text + "\n")
    return path


def _edit_problem(item: ReviewItem, decision: Decision) -> str | None:
    """Why an edited decision does not fit `item` (it names fields the item lacks), or None."""
    unknown = sorted(set(decision.fields) - set(item.fields))
    if decision.status == "edited" and unknown:
        return f"edits unknown field(s) {unknown}; the item has {sorted(item.fields)}"
    return None


def apply_decisions(items: Iterable[ReviewItem], decisions: Mapping[str, Decision]) -> list[ReviewItem]:
    """The items the next build step uses: rejected dropped, edited with their edited values, accepted
    unchanged. Undecided items are kept as generated, so a build whose review was skipped or is
    unfinished still works (their count is logged). Decisions naming no item are ignored with a warning."""
    items = list(items)
    unknown = sorted(set(decisions) - {item.id for item in items})
    if unknown:
        shown = ", ".join(repr(i) for i in unknown[:5]) + (" …" if len(unknown) > 5 else "")
        log.warning("%d review decision(s) name no item and are ignored: %s", len(unknown), shown)
    kept: list[ReviewItem] = []
    for item in items:
        decision = decisions.get(item.id)
        if decision is None or decision.status == "accepted":
            kept.append(item)
        elif decision.status == "edited":
            problem = _edit_problem(item, decision)
            if problem:
                raise BadRecordError(f"decision for item {item.id!r}: {problem}")
            kept.append(replace(item, fields={**item.fields, **decision.fields}))
    undecided = sum(item.id not in decisions for item in items)
    if undecided:
        log.info("%d of %d items were not reviewed; kept as generated", undecided, len(items))
    return kept


# ----------------------------------------------------------------------------------------------- page


def _json_for_script(value: object) -> str:
    """JSON safe inside <script>: '<', '>' and '&' as \\u escapes, so no '</script' or '<!--' appears."""
    text = json.dumps(value, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _render_field(name: str, value: str) -> str:
    rows = min(8, max(1, value.count("\n") + 1 + len(value) // 90))
    return (
        f'<label class="field"><span class="key">{html.escape(name)}</span>'
        # the parser drops one newline right after <textarea>: give it one so a leading newline survives
        f'<textarea data-field="{html.escape(name)}" rows="{rows}" readonly>\n{html.escape(value)}</textarea>'
        "</label>"
    )


def _render_card(index: int, item: ReviewItem, decision: Decision | None) -> str:
    """One item's card; the script keeps it up to date, this first rendering already shows the truth."""
    status = decision.status if decision else "undecided"
    shown = {**item.fields, **decision.fields} if decision else item.fields
    fields = "".join(_render_field(name, shown[name]) for name in item.fields)
    images = "".join(
        f'<img src="{html.escape(quote(p))}" alt="{html.escape(p)}" title="{html.escape(p)}">'
        for p in item.images
    )
    return f"""<section class="item" data-index="{index}" data-status="{status}" tabindex="-1">
<header><span class="num">{index + 1}</span><span class="step">{html.escape(item.step)}</span>
<span class="id">{html.escape(item.id)}</span><span class="status">{status}</span>
<span class="saved" aria-live="polite"></span></header>
<div class="fields">{fields}</div>
<div class="images">{images}</div>
<div class="buttons"><button type="button" data-action="accept">Accept</button>
<button type="button" data-action="reject">Reject</button>
<button type="button" data-action="edit">Edit</button>
<button type="button" data-action="save" hidden>Save</button>
<button type="button" data-action="cancel" hidden>Cancel</button></div>
</section>"""


def render_page(
    directory: Path, items: Iterable[ReviewItem], decisions: Mapping[str, Decision], *, static: bool
) -> str:
    """The review page as one self-contained HTML document (inline CSS and script, nothing fetched but
    the items' images). Served pages POST each decision to /decisions; static ones keep them in memory
    and offer them as a review_decisions.json download."""
    items = list(items)
    data = {
        "static": static,
        "format": DECISIONS_FORMAT,
        "version": DECISIONS_VERSION,
        "items": [{"id": item.id, "fields": item.fields} for item in items],
        # decisions for ids without an item are carried along so a download never loses them
        "decisions": _decisions_json(decisions)["decisions"],
    }
    cards = "\n".join(_render_card(i, item, decisions.get(item.id)) for i, item in enumerate(items))
    decided = sum(item.id in decisions for item in items)
    title = f"mmke review: {Path(directory).resolve().name}"
    parts = {
        "TITLE": html.escape(title),
        "CSS": _CSS,
        "MODE": "static" if static else "served",
        "PROGRESS": f"{decided}/{len(items)}",
        "CARDS": cards,
        "DATA": _json_for_script(data),
        "JS": _JS,
    }
    # one pass, so a field that happens to contain "@@DATA@@" is never substituted itself
    return re.sub(r"@@([A-Z]+)@@", lambda m: parts[m.group(1)], _PAGE)


def write_static(directory: Path) -> Path:
    """Write DIR/review.html, the page in static mode (decisions are downloaded, not saved), for
    reviewers who open it without a server; it starts from the decisions already in DIR."""
    directory = Path(directory)
    page = render_page(directory, read_items(directory), read_decisions(directory), static=True)
    path = directory / PAGE_FILE
    write_atomic(path, page)
    return path


# --------------------------------------------------------------------------------------------- server


class _ReviewState:
    """What a server shares between request threads; `lock` guards `decisions` and the file."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.root = self.directory.resolve()
        self.items = read_items(self.directory)
        self.by_id = {item.id: item for item in self.items}
        self.images = {str(PurePosixPath(p)) for item in self.items for p in item.images}
        self.decisions = read_decisions(self.directory)
        self.lock = threading.Lock()

    def page(self) -> str:
        with self.lock:
            decisions = dict(self.decisions)
        return render_page(self.directory, self.items, decisions, static=False)

    def decisions_json(self) -> dict[str, object]:
        with self.lock:
            return _decisions_json(dict(self.decisions))

    def decide(self, item_id: str, decision: Decision) -> int:
        """Record and save one decision; returns how many items are decided."""
        with self.lock:
            updated = {**self.decisions, item_id: decision}
            save_decisions(self.directory, updated)  # memory changes only once the file has
            self.decisions = updated
            return sum(known in updated for known in self.by_id)


def _load_body(body: bytes) -> object:
    """A POST body (any bytes a client sends) as JSON; BadRecordError says in one line why it is not."""
    try:
        text = body.decode("utf-8")  # json.loads(bytes) would also guess UTF-16 and UTF-32
    except UnicodeDecodeError as e:
        raise BadRecordError(f"body is not UTF-8 (byte {e.start} cannot be decoded)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRecordError(f"body is not valid JSON ({e})") from None
    except RecursionError:
        raise BadRecordError("body is nested too deeply; send a flat {id, status, fields} object") from None
    except ValueError:  # int() refuses numbers of thousands of digits
        raise BadRecordError("body holds a number with too many digits") from None


def _parse_post(body: bytes, by_id: Mapping[str, ReviewItem]) -> tuple[str, Decision]:
    """A POSTed {"id", "status", "fields"} as (id, Decision); BadRecordError says what is wrong."""
    obj = _load_body(body)
    if not isinstance(obj, dict):
        raise BadRecordError(f"body must be a JSON object {{id, status, fields}}, not {_clip(obj)}")
    unknown = sorted(set(obj) - _POST_KEYS)
    if unknown:
        shown = ", ".join(_clip(k) for k in unknown[:5]) + (" …" if len(unknown) > 5 else "")
        raise BadRecordError(f"unknown keys [{shown}]; send {sorted(_POST_KEYS)}")
    item_id = obj.get("id")
    if not isinstance(item_id, str) or item_id not in by_id:
        raise BadRecordError(f"no item with id {_clip(item_id)}")
    decision = _parse_decision({k: v for k, v in obj.items() if k != "id"})
    problem = _edit_problem(by_id[item_id], decision)
    if problem:
        raise BadRecordError(problem)
    try:  # JSON may spell a lone surrogate ("\ud800"), which the UTF-8 decisions file cannot hold
        json.dumps(decision.fields, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRecordError(
            "'fields' hold a lone surrogate (\\ud800-\\udfff), which UTF-8 cannot store"
        ) from None
    return item_id, decision


def _one_line(text: str, limit: int = _MAX_ERROR_CHARS) -> str:
    """`text` as one line of at most `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _log_failure(what: str, exc: BaseException | None) -> None:
    """One log line for an error while serving: debug for a client that went away (its own doing),
    else an error without traceback (that goes to debug, for -v)."""
    if isinstance(exc, _CLIENT_GONE):
        log.debug("review server: %s: the client went away (%s)", what, exc)
        return
    log.error("review server: %s failed: %s", what, _one_line(f"{type(exc).__name__}: {exc}"))
    log.debug("review server: traceback of the failure above", exc_info=exc)


class _ReviewHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], state: _ReviewState) -> None:
        super().__init__(address, _Handler)
        self.state = state

    def handle_error(self, request: object, client_address: object) -> None:
        # what _Handler.handle_one_request did not catch (setting up or closing a connection); the
        # default prints a traceback to stderr, the library only logs
        _log_failure(f"a connection from {client_address}", sys.exc_info()[1])


class _Handler(BaseHTTPRequestHandler):
    server: _ReviewHTTPServer
    server_version = "mmke-review"
    timeout = 60  # seconds a socket read or write may stall before the connection is dropped
    _answered = False  # whether this request's response has begun (too late for a 500 then)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("review server: " + format, *args)

    def handle_one_request(self) -> None:
        """The base class's, with failures logged as one line and answered with a 500 where still possible."""
        self._answered = False
        try:
            super().handle_one_request()
        except Exception as e:
            self.close_connection = True
            request = getattr(self, "requestline", "")  # unset when reading the request line failed
            _log_failure(_one_line(repr(request), 120) if request else "reading a request", e)
            if not isinstance(e, _CLIENT_GONE):
                self._answer_500(e)

    def _answer_500(self, exc: Exception) -> None:
        if self._answered:
            return
        error = f"server error ({type(exc).__name__})"
        with contextlib.suppress(OSError):  # the connection is unusable too: the log line is all there is
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": error})

    def do_GET(self) -> None:
        if not self._host_ok():
            return
        path = unquote(self.path.split("?", 1)[0].split("#", 1)[0])
        state = self.server.state
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, state.page().encode("utf-8"), "text/html; charset=utf-8")
        elif path == "/decisions":
            self._send_json(HTTPStatus.OK, state.decisions_json())
        else:
            self._send_image(path.lstrip("/"))

    def do_POST(self) -> None:
        if not self._host_ok():
            return
        if self.path.split("?", 1)[0] != "/decisions":
            self._send_json(HTTPStatus.NOT_FOUND, {"error": "POST only to /decisions"})
            return
        body = self._read_json_body()
        if body is None:
            return
        state = self.server.state
        try:
            item_id, decision = _parse_post(body, state.by_id)
        except BadRecordError as e:
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": _one_line(str(e))})
            return
        try:
            decided = state.decide(item_id, decision)
        except OSError as e:
            log.error("review server: could not save %s: %s", DECISIONS_FILE, e)
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"could not save: {e.strerror}"})
            return
        self._send_json(HTTPStatus.OK, {"ok": True, "decided": decided, "total": len(state.items)})

    def _host_ok(self) -> bool:
        """Refuse requests for other host names: a web page must not reach this server by DNS rebinding."""
        port = self.server.server_address[1]
        if self.headers.get("Host", "") in {f"{h}:{port}" for h in _LOOPBACK_HOSTS}:
            return True
        self._send_json(HTTPStatus.FORBIDDEN, {"error": "unexpected Host header"})
        return False

    def _read_json_body(self) -> bytes | None:
        """The request body, or None after answering why it is refused."""
        # requiring application/json makes cross-site form posts impossible (they need a CORS preflight)
        if self.headers.get_content_type() != "application/json":
            self._send_json(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send Content-Type application/json"}
            )
            return None
        raw = self.headers.get("Content-Length")
        if raw is None:
            self._send_json(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length required"})
            return None
        if not re.fullmatch(r"[0-9]+", raw.strip()):
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": f"bad Content-Length {_clip(raw)}"})
            return None
        digits = raw.strip().lstrip("0") or "0"  # no int() of a thousand-digit header
        if len(digits) > len(str(_MAX_POST_BYTES)) or int(digits) > _MAX_POST_BYTES:
            error = f"body too large: at most {_MAX_POST_BYTES} bytes"
            self._send_json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": error})
            return None
        return self.rfile.read(int(digits))

    def _send_image(self, relative: str) -> None:
        state = self.server.state
        if _image_problem(state.root, relative):
            self._send_json(HTTPStatus.FORBIDDEN, {"error": "outside the review directory"})
            return
        # only the items' own images: the directory may hold files that are nobody's business
        path = state.root / relative
        content_type = _IMAGE_TYPES.get(path.suffix.lower())
        if str(PurePosixPath(relative)) not in state.images or content_type is None or not path.is_file():
            self._send_json(HTTPStatus.NOT_FOUND, {"error": "not an image of this review"})
            return
        self._send(HTTPStatus.OK, path.read_bytes(), content_type)

    def _send_json(self, status: HTTPStatus, obj: object) -> None:
        self._send(status, json.dumps(obj).encode("utf-8"), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self._answered = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        # belt and braces for "no external resources": the browser refuses anything not from here
        self.send_header(
            "Content-Security-Policy",
            "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
            "script-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'",
        )
        self.end_headers()
        self.wfile.write(body)


class ReviewServer:
    """A running review server on 127.0.0.1; close() or leaving a `with` block stops it."""

    def __init__(self, httpd: _ReviewHTTPServer) -> None:
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="mmke-review", daemon=True
        )
        self._thread.start()
        self._closed = False

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C raises KeyboardInterrupt here, as usual)."""
        while self._thread.is_alive():
            self._thread.join(0.5)  # a timed join keeps Ctrl-C responsive

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> ReviewServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def serve(directory: Path, host: str = "127.0.0.1", port: int = 0) -> ReviewServer:
    """Serve the review page of `directory` (port 0: any free port) from a daemon thread; each decision
    is saved to DIR/review_decisions.json as it is made. Only loopback: the server has no login."""
    if host not in _LOOPBACK_HOSTS:
        raise ConfigError(f"review server host {host!r}: only 127.0.0.1 (it has no authentication)")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= _MAX_PORT:
        raise ConfigError(
            f"port {port!r} is out of range (0-{_MAX_PORT}); pass --port P with a port in that range, "
            "or 0 for any free one"
        )
    state = _ReviewState(Path(directory))
    return ReviewServer(_listen(state, port))


def _listen(state: _ReviewState, port: int) -> _ReviewHTTPServer:
    """A server listening on 127.0.0.1:`port`; a ConfigError says why it cannot and what to do instead."""
    try:
        return _ReviewHTTPServer(("127.0.0.1", port), state)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            problem = "is in use on 127.0.0.1"
        elif e.errno == errno.EACCES:
            problem = "on 127.0.0.1 needs administrator rights (ports below 1024 do)"
        else:
            problem = f"cannot be opened on 127.0.0.1 ({e.strerror or e})"
        raise ConfigError(
            f"port {port} {problem}; pass --port P with another port, or 0 for any free one"
        ) from None


# ------------------------------------------------------------------------------------ page template

_PAGE = """<!DOCTYPE html>
<html lang="en" data-mode="@@MODE@@">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>@@TITLE@@</title>
<style>@@CSS@@</style>
</head>
<body>
<div id="bar">
<h1>@@TITLE@@</h1>
<span class="progress">decided <b id="progress">@@PROGRESS@@</b></span>
<span id="saved" aria-live="polite"></span>
<button type="button" id="download" hidden>Download decisions</button>
<p id="help"><kbd>j</kbd>/<kbd>k</kbd> next/previous · <kbd>a</kbd> accept · <kbd>r</kbd> reject ·
<kbd>e</kbd> edit (<kbd>Enter</kbd> or Save commits, <kbd>Shift</kbd>+<kbd>Enter</kbd> new line,
<kbd>Esc</kbd> cancels) · undecided items are kept as generated</p>
</div>
<main id="items">
@@CARDS@@
</main>
<script type="application/json" id="review-data">@@DATA@@</script>
<script>@@JS@@</script>
</body>
</html>
"""

_CSS = """
:root { --accepted: #1a7f37; --rejected: #c62828; --edited: #9a6700; --current: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, sans-serif; color: #1f2328; background: #f6f8fa; }
#bar { position: sticky; top: 0; z-index: 1; background: #fff; border-bottom: 1px solid #d0d7de;
  padding: 8px 16px; display: flex; flex-wrap: wrap; gap: 4px 16px; align-items: baseline; }
#bar h1 { font-size: 16px; margin: 0; }
#help { flex-basis: 100%; margin: 0; color: #59636e; font-size: 12px; }
kbd { border: 1px solid #d0d7de; border-radius: 3px; padding: 0 3px; background: #f6f8fa; font-size: 11px; }
#saved.ok { color: var(--accepted); } #saved.bad { color: var(--rejected); font-weight: 600; }
main { padding: 12px 16px; display: grid; gap: 10px; max-width: 1100px; }
.item { background: #fff; border: 1px solid #d0d7de; border-left: 6px solid #d0d7de; border-radius: 6px;
  padding: 8px 12px; outline: none; }
.item.current { box-shadow: 0 0 0 2px var(--current); }
.item[data-status=accepted] { border-left-color: var(--accepted); }
.item[data-status=rejected] { border-left-color: var(--rejected); opacity: .6; }
.item[data-status=edited] { border-left-color: var(--edited); }
.item header { display: flex; gap: 10px; align-items: baseline; }
.num { color: #59636e; } .step { font-weight: 600; } .id { font-family: monospace; color: #59636e; }
.status { margin-left: auto; text-transform: uppercase; font-size: 11px; font-weight: 700; }
.item[data-status=accepted] .status { color: var(--accepted); }
.item[data-status=rejected] .status { color: var(--rejected); }
.item[data-status=edited] .status { color: var(--edited); }
.saved { font-size: 11px; color: #59636e; } .saved.bad { color: var(--rejected); }
.field { display: grid; grid-template-columns: 120px 1fr; gap: 8px; margin: 4px 0; }
.key { color: #59636e; text-align: right; padding-top: 3px; }
textarea { font: inherit; width: 100%; resize: none; border: 1px solid transparent; background: none;
  padding: 2px 4px; }
textarea[readonly]:focus { outline: none; }
.editing textarea { border-color: var(--current); background: #fff; resize: vertical; }
.images { display: flex; gap: 8px; flex-wrap: wrap; }
.images img { max-height: 160px; max-width: 320px; border: 1px solid #d0d7de; image-rendering: auto; }
.buttons { display: flex; gap: 6px; margin-top: 6px; }
button { font: inherit; padding: 2px 10px; border: 1px solid #d0d7de; border-radius: 4px; background: #f6f8fa;
  cursor: pointer; }
button[data-action=accept] { color: var(--accepted); } button[data-action=reject] { color: var(--rejected); }
.item[data-status=accepted] button[data-action=accept] { background: #dafbe1; font-weight: 600; }
.item[data-status=rejected] button[data-action=reject] { background: #ffebe9; font-weight: 600; }
.item[data-status=edited] button[data-action=edit] { background: #fff8c5; font-weight: 600; }
"""

_JS = r"""
"use strict";
(() => {
  const DATA = JSON.parse(document.getElementById("review-data").textContent);
  const items = DATA.items;
  const decisions = new Map(Object.entries(DATA.decisions));  // a Map: ids like "constructor" are safe
  const cards = Array.from(document.querySelectorAll("section.item"));
  const savedEl = document.getElementById("saved");
  let current = 0, editing = -1, pending = 0, failed = 0, unsaved = false;
  let queue = Promise.resolve();  // POSTs go one at a time, so the server sees them in order

  const norm = (s) => s.replace(/\r\n?/g, "\n");  // textareas normalise line ends
  const fieldsOf = (i) => Array.from(cards[i].querySelectorAll("textarea[data-field]"));

  function shown(i, key) {
    const d = decisions.get(items[i].id);
    return d && d.status === "edited" && Object.hasOwn(d.fields, key) ? d.fields[key] : items[i].fields[key];
  }

  function render(i) {
    const d = decisions.get(items[i].id);
    const status = d ? d.status : "undecided";
    cards[i].dataset.status = status;
    cards[i].querySelector(".status").textContent = status;
    if (editing !== i) for (const t of fieldsOf(i)) t.value = shown(i, t.dataset.field);
    const decided = items.filter((it) => decisions.has(it.id)).length;
    document.getElementById("progress").textContent = decided + "/" + items.length;
  }

  function select(i, scroll = true) {
    if (!cards.length) return;
    current = Math.max(0, Math.min(cards.length - 1, i));
    cards.forEach((c, j) => c.classList.toggle("current", j === current));
    if (scroll) cards[current].scrollIntoView({block: "nearest"});
  }

  function setSaved(i, text, cls) {
    const el = cards[i].querySelector(".saved");
    el.textContent = text;
    el.className = "saved " + (cls || "");
  }

  function showGlobal() {
    if (DATA.static) {
      savedEl.textContent = unsaved ? "not downloaded yet" : "";
      savedEl.className = unsaved ? "bad" : "";
    } else if (pending) {
      savedEl.textContent = "saving…"; savedEl.className = "";
    } else {
      savedEl.textContent = failed ? "some decisions failed to save" : "all saved";
      savedEl.className = failed ? "bad" : "ok";
    }
  }

  function decide(i, status, fields) {
    const id = items[i].id, before = decisions.get(id), d = {status, fields: fields || {}};
    decisions.set(id, d);
    render(i);
    if (DATA.static) {
      unsaved = true;
      setSaved(i, "in memory", "");
    } else {
      pending += 1;
      setSaved(i, "saving…", "");
      queue = queue.then(() => post(i, d, before));
    }
    showGlobal();
  }

  async function post(i, d, before) {
    const id = items[i].id;
    try {
      const r = await fetch("/decisions", {
        method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({id, status: d.status, fields: d.fields}),
      });
      const body = await r.json().catch(() => ({}));
      if (!r.ok) throw new Error(body.error || "HTTP " + r.status);
      setSaved(i, "saved", "ok");
    } catch (e) {
      failed += 1;
      // the page must show what the file holds: undo a decision the server did not keep
      if (decisions.get(id) === d) {
        if (before) decisions.set(id, before); else decisions.delete(id);
        render(i);
      }
      setSaved(i, "failed: " + e.message, "bad");
    } finally {
      pending -= 1;
      showGlobal();
    }
  }

  function setEditing(i, on) {
    cards[i].classList.toggle("editing", on);
    for (const t of fieldsOf(i)) t.readOnly = !on;
    for (const b of cards[i].querySelectorAll("button[data-action]")) {
      const editButton = b.dataset.action === "save" || b.dataset.action === "cancel";
      b.hidden = on ? !editButton : editButton;
    }
  }

  function startEdit(i) {
    if (editing >= 0) cancelEdit();
    select(i);
    editing = i;
    setEditing(i, true);
    const first = fieldsOf(i)[0];
    if (first) first.focus();
  }

  function stopEdit() {
    const i = editing;
    editing = -1;
    setEditing(i, false);
    cards[i].focus({preventScroll: true});
    return i;
  }

  function cancelEdit() { render(stopEdit()); }

  function saveEdit() {
    const i = editing, changed = {};
    for (const t of fieldsOf(i)) {
      const key = t.dataset.field;
      if (norm(t.value) !== norm(items[i].fields[key])) changed[key] = t.value;
    }
    stopEdit();
    // saving unchanged values is a plain accept: an "edited" decision always changes something
    decide(i, Object.keys(changed).length ? "edited" : "accepted", changed);
  }

  function sortedKeys(obj) {
    const out = {};
    for (const k of Object.keys(obj).sort()) out[k] = obj[k];
    return out;
  }

  function download() {
    const all = {};
    for (const id of Array.from(decisions.keys()).sort()) {
      const d = decisions.get(id);
      all[id] = {fields: sortedKeys(d.fields), status: d.status};
    }
    const doc = {decisions: all, format: DATA.format, version: DATA.version};
    const blob = new Blob([JSON.stringify(doc, null, 1) + "\n"], {type: "application/json"});
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = "review_decisions.json";
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
    unsaved = false;
    showGlobal();
  }

  document.addEventListener("click", (ev) => {
    const card = ev.target.closest("section.item");
    if (!card) return;
    const i = Number(card.dataset.index);
    const button = ev.target.closest("button[data-action]");
    if (editing >= 0 && editing !== i) cancelEdit();
    select(i, false);
    if (!button) return;
    const action = button.dataset.action;
    if (action === "accept") decide(i, "accepted");
    else if (action === "reject") decide(i, "rejected");
    else if (action === "edit") startEdit(i);
    else if (action === "save") saveEdit();
    else if (action === "cancel") cancelEdit();
  });

  document.addEventListener("keydown", (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey || ev.isComposing || !cards.length) return;
    if (editing >= 0) {
      if (ev.key === "Escape") { ev.preventDefault(); cancelEdit(); }
      else if (ev.key === "Enter" && !ev.shiftKey && ev.target.matches("textarea")) {
        ev.preventDefault(); saveEdit();
      }
      return;
    }
    const actions = {
      j: () => select(current + 1),
      k: () => select(current - 1),
      a: () => { decide(current, "accepted"); select(current + 1); },
      r: () => { decide(current, "rejected"); select(current + 1); },
      e: () => startEdit(current),
    };
    if (Object.hasOwn(actions, ev.key)) { ev.preventDefault(); actions[ev.key](); }
  });

  if (DATA.static) {
    const button = document.getElementById("download");
    button.hidden = false;
    button.addEventListener("click", download);
    window.addEventListener("beforeunload", (ev) => { if (unsaved) ev.preventDefault(); });
  }
  cards.forEach((_, i) => render(i));
  select(0, false);
  showGlobal();
})();
"""
