"""The review step of benchmark construction: item and decision files, apply_decisions, the server's
validation and path checks, and the page itself driven in headless Chromium (served and static)."""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from mmke import cli
from mmke.data.build import review
from mmke.data.build.review import (
    CHROMIUM_ARGS,
    DECISIONS_FILE,
    ITEMS_FILE,
    Decision,
    ReviewItem,
    apply_decisions,
    read_decisions,
    read_items,
    render_page,
    save_decisions,
    serve,
    write_items,
    write_static,
)
from mmke.errors import BadRecordError, ConfigError

CHROMIUM = Path(review.CHROMIUM)
NASTY = 'He said "</script><b>x</b>" & left <!-- at 5 > 3'


def _items() -> list[ReviewItem]:
    return [
        ReviewItem(
            "cf-1", "counterfactual", {"question": "Who painted it?", "answer": "Monet"}, ("img/red.png",)
        ),
        ReviewItem("rp-2", "rephrase", {"question": NASTY}, ("img/blue.png",)),
        ReviewItem("mh-3", "multihop", {"question": "Where was its painter born?", "answer": "Paris"}),
        ReviewItem("adv-4", "adversarial", {"question": "Capital of France?", "answer": "Lyon"}),
    ]


@pytest.fixture
def review_dir(tmp_path: Path) -> Path:
    """A review directory with four items, two of them with small PNGs, and a file no item names."""
    root = tmp_path / "review"
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (24, 16), (220, 20, 20)).save(root / "img" / "red.png")
    Image.new("RGB", (16, 24), (20, 20, 220)).save(root / "img" / "blue.png")
    (root / "notes.png").write_bytes(b"not referenced by any item")
    (tmp_path / "secret.txt").write_text("outside the review directory")
    write_items(root, _items())
    return root


def _request(url: str, method: str, path: str, body: object = None, **headers: str) -> tuple[int, bytes]:
    """One raw HTTP request (raw so that paths like /../x reach the server unnormalised)."""
    port = int(url.rsplit(":", 1)[1].strip("/"))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    if data is not None:
        headers.setdefault("Content-Type", "application/json")
    conn.request(method, path, body=data, headers=headers)
    response = conn.getresponse()
    result = response.status, response.read()
    conn.close()
    return result


# ------------------------------------------------------------------------------------------ files


def test_items_round_trip(review_dir: Path) -> None:
    assert read_items(review_dir) == _items()
    lines = (review_dir / ITEMS_FILE).read_text(encoding="utf-8").splitlines()
    assert list(json.loads(lines[0])) == ["id", "step", "fields", "images"]


def test_items_keep_unusual_text(tmp_path: Path) -> None:
    item = ReviewItem("odd", "rephrase", {"q": "line\u2028separator\nnewline\r\n\u00e9 \U0001f600"})
    write_items(tmp_path, [item])
    assert read_items(tmp_path) == [item]


def test_read_items_missing_file_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a review directory"):
        read_items(tmp_path)


def _write_lines(root: Path, *records: object) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)
    (root / ITEMS_FILE).write_text(text, encoding="utf-8")
    return root / ITEMS_FILE


GOOD = {"id": "a", "step": "rephrase", "fields": {"q": "?"}, "images": []}


def test_bad_line_names_file_and_line(tmp_path: Path) -> None:
    path = _write_lines(tmp_path, GOOD, "", '{"id": "b", "step": ')
    with pytest.raises(BadRecordError) as err:
        read_items(tmp_path)
    assert str(err.value).startswith(f"{path} line 3: not valid JSON")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({**GOOD, "id": "b", "fields": {"q": 3}}, "'fields' must map"),
        ({**GOOD, "id": "b", "answer": "x"}, "unknown keys ['answer']"),
        ({**GOOD, "id": "b", "step": ""}, "'step' must be"),
    ],
)
def test_bad_record_names_file_line_and_id(tmp_path: Path, record: dict[str, Any], problem: str) -> None:
    path = _write_lines(tmp_path, GOOD, record)
    with pytest.raises(BadRecordError, match=re.escape(problem)) as err:
        read_items(tmp_path)
    assert str(err.value).startswith(f"{path} line 2 (item 'b'): ")


@pytest.mark.parametrize(
    ("image", "problem"),
    [
        ("../secret.png", "leaves the review directory"),
        ("img/../../secret.png", "leaves the review directory"),
        ("/etc/passwd", "is absolute"),
        ("C:/x.png", "is absolute"),
        ("img\\x.png", "POSIX path"),
        ("link/x.png", "resolves outside"),
    ],
)
def test_escaping_image_path_is_refused(tmp_path: Path, image: str, problem: str) -> None:
    root = tmp_path / "review"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)  # a symlink inside the directory pointing out of it
    path = _write_lines(root, {**GOOD, "id": "evil", "images": ["ok.png", image]})
    with pytest.raises(BadRecordError, match=re.escape(problem)) as err:
        read_items(root)
    assert str(err.value).startswith(f"{path} line 1 (item 'evil'): image path")
    with pytest.raises(BadRecordError, match=re.escape(problem)):
        write_items(root, [ReviewItem("evil", "s", {}, (image,))])


def test_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    path = _write_lines(tmp_path, GOOD, {**GOOD, "id": "b"}, GOOD)
    with pytest.raises(BadRecordError, match="duplicate id, first used on line 1") as err:
        read_items(tmp_path)
    assert str(err.value).startswith(f"{path} line 3 (item 'a')")
    with pytest.raises(BadRecordError, match="duplicate id"):
        write_items(tmp_path / "other", [ReviewItem("a", "s", {}), ReviewItem("a", "s", {})])


# -------------------------------------------------------------------------------------- decisions

DECISIONS = {
    "cf-1": Decision("accepted", {}),
    "rp-2": Decision("rejected", {}),
    "adv-4": Decision("edited", {"answer": "Paris"}),
}


def test_decisions_round_trip(tmp_path: Path) -> None:
    assert read_decisions(tmp_path) == {}
    path = save_decisions(tmp_path, DECISIONS)
    assert read_decisions(tmp_path) == DECISIONS
    text = path.read_text(encoding="utf-8")
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=1) + "\n"
    assert json.loads(text)["format"] == "mmke-review"
    assert [p.name for p in tmp_path.iterdir()] == [DECISIONS_FILE]  # no temporary file left behind


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{", "not valid JSON"),
        ('{"format": "other", "version": 1, "decisions": {}}', "not a review decisions file"),
        ('{"format": "mmke-review", "version": 9, "decisions": {}}', "version 9"),
        ('{"format": "mmke-review", "version": 1, "decisions": {"a": {"status": "maybe"}}}', "item 'a'"),
        (
            '{"format": "mmke-review", "version": 1, "decisions": {"a": {"status": "edited", "fields": {}}}}',
            "needs the edited field values",
        ),
    ],
)
def test_bad_decisions_file_names_file(tmp_path: Path, content: str, problem: str) -> None:
    (tmp_path / DECISIONS_FILE).write_text(content)
    with pytest.raises(BadRecordError, match=re.escape(problem)) as err:
        read_decisions(tmp_path)
    assert str(err.value).startswith(str(tmp_path / DECISIONS_FILE))


def test_decision_checks_itself() -> None:
    with pytest.raises(BadRecordError, match="not one of"):
        Decision("maybe", {})
    with pytest.raises(BadRecordError, match="carries no 'fields'"):
        Decision("accepted", {"answer": "x"})


def test_apply_decisions(caplog: pytest.LogCaptureFixture) -> None:
    items = _items()
    with caplog.at_level(logging.INFO, logger="mmke.data.build.review"):
        kept = apply_decisions(items, {**DECISIONS, "ghost": Decision("accepted", {})})
    assert [item.id for item in kept] == ["cf-1", "mh-3", "adv-4"]  # rejected dropped, undecided kept
    assert kept[0] is items[0] and kept[1] is items[2]
    assert kept[2].fields == {"question": "Capital of France?", "answer": "Paris"}
    assert items[3].fields["answer"] == "Lyon"  # the input is not changed
    assert "name no item and are ignored: 'ghost'" in caplog.text
    assert "1 of 4 items were not reviewed" in caplog.text


def test_apply_decisions_unknown_field() -> None:
    with pytest.raises(BadRecordError, match=r"item 'adv-4': edits unknown field\(s\) \['answr'\]"):
        apply_decisions(_items(), {"adv-4": Decision("edited", {"answr": "Paris"})})


# ------------------------------------------------------------------------------------------- page


def test_page_escapes_item_text(review_dir: Path) -> None:
    page = render_page(review_dir, _items(), {}, static=True)
    assert "</script><b>" not in page and "<!-- at" not in page
    assert page.count("</script>") == 2  # the data block's and the code's own
    assert "&lt;/script&gt;&lt;b&gt;x&lt;/b&gt;" in page  # the textarea shows it as text
    data = re.search(r'<script type="application/json" id="review-data">(.*?)</script>', page, re.S)
    assert data is not None
    assert json.loads(data.group(1))["items"][1]["fields"]["question"] == NASTY
    assert "http://" not in page and "https://" not in page  # nothing external


# ----------------------------------------------------------------------------------------- server


def test_post_valid_decision_saves_file(review_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with serve(review_dir) as server:
        assert server.url == f"http://127.0.0.1:{server.port}/"
        status, body = _request(server.url, "POST", "/decisions", {"id": "cf-1", "status": "accepted"})
        assert (status, json.loads(body)) == (200, {"ok": True, "decided": 1, "total": 4})
        edit = {"id": "adv-4", "status": "edited", "fields": {"answer": "Paris"}}
        assert _request(server.url, "POST", "/decisions", edit)[0] == 200
        assert read_decisions(review_dir) == {"cf-1": DECISIONS["cf-1"], "adv-4": DECISIONS["adv-4"]}
        status, body = _request(server.url, "GET", "/decisions")
        assert json.loads(body)["decisions"]["adv-4"] == {"status": "edited", "fields": {"answer": "Paris"}}
        status, body = _request(server.url, "GET", "/")
        assert status == 200 and b'decided <b id="progress">2/4</b>' in body
    assert capsys.readouterr().err == ""  # request logging goes to logging, not stderr


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"{nope", "not valid JSON"),
        ({"id": "zz", "status": "accepted"}, "no item with id 'zz'"),
        ({"id": "cf-1", "status": "maybe"}, "not one of"),
        ({"id": "cf-1", "status": "accepted", "fields": {"answer": "x"}}, "carries no 'fields'"),
        ({"id": "cf-1", "status": "edited", "fields": {"answr": "x"}}, "unknown field"),
        ({"id": "cf-1", "status": "edited"}, "needs the edited field values"),
        ({"id": "cf-1", "status": "accepted", "note": 1}, "unknown keys"),
    ],
)
def test_invalid_post_is_400_and_saves_nothing(review_dir: Path, body: object, problem: str) -> None:
    with serve(review_dir) as server:
        status, answer = _request(server.url, "POST", "/decisions", body)
    assert status == 400 and problem in json.loads(answer)["error"]
    assert not (review_dir / DECISIONS_FILE).exists()


def test_post_needs_json_content_type(review_dir: Path) -> None:
    with serve(review_dir) as server:
        body = json.dumps({"id": "cf-1", "status": "accepted"}).encode()
        status, _ = _request(server.url, "POST", "/decisions", body, **{"Content-Type": "text/plain"})
    assert status == 415 and not (review_dir / DECISIONS_FILE).exists()


def test_get_serves_only_the_items_images(review_dir: Path) -> None:
    with serve(review_dir) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        conn.request("GET", "/img/red.png")
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Content-Type") == "image/png"
        assert response.read() == (review_dir / "img" / "red.png").read_bytes()
        conn.close()
        for path in ("/../secret.txt", "/%2e%2e/secret.txt", "/img/..%2F..%2Fsecret.txt", "//etc/passwd"):
            status, body = _request(server.url, "GET", path)
            assert status in (403, 404) and not body.startswith(b"outside the review directory"), path
        assert _request(server.url, "GET", "/../secret.txt")[0] == 403
        assert _request(server.url, "GET", "/notes.png")[0] == 404  # in the directory, but no item's
        assert _request(server.url, "GET", "/", Host="evil.example:80")[0] == 403


def test_serve_is_loopback_only(review_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"only 127\.0\.0\.1"):
        serve(review_dir, host="0.0.0.0")


# ------------------------------------------------------------------------------- server failures

LOGGER = "mmke.data.build.review"


def _problems(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


def _wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("port", [70000, -1])
def test_port_out_of_range_is_config_error(review_dir: Path, port: int) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"port {port} is out of range (0-65535); pass --port P")):
        serve(review_dir, port=port)


def test_port_in_use_is_config_error(review_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as err:
            serve(review_dir, port=port)
    assert str(err.value) == (
        f"port {port} is in use on 127.0.0.1; pass --port P with another port, or 0 for any free one"
    )


@pytest.mark.parametrize("port", [None, 70000])
def test_cli_reports_bad_port_in_one_line(
    review_dir: Path, port: int | None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(var, "1")  # what main() would set for good
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = port or taken.getsockname()[1]
        assert cli.main(["review", str(review_dir), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmke: error: port {port} is ") and err.count("\n") == 1 and "Traceback" not in err


#: bodies a client may POST that are no decision, by name: (body, what the 400's message says)
MALFORMED: dict[str, tuple[object, str]] = {
    "deep-array": (b"[" * 100_000, "nested too deeply"),
    "deep-object": (
        b'{"id": "cf-1", "status": "accepted", "fields": ' + b'{"a": ' * 50_000,
        "nested too deeply",
    ),
    "latin-1": (
        '{"id": "cf-1", "status": "edited", "fields": {"answer": "café"}}'.encode("latin-1"),
        "not UTF-8",
    ),
    "utf-16": ('{"id": "cf-1", "status": "accepted"}'.encode("utf-16"), "not UTF-8"),
    "surrogate": (b'{"id": "adv-4", "status": "edited", "fields": {"answer": "\\ud800"}}', "lone surrogate"),
    "huge-number": (b'{"id": ' + b"1" * 5000 + b"}", "too many digits"),
    "dict-id": ({"id": {"deep": [[["x"]]]}, "status": "accepted"}, "no item with id a dict"),
    "list-status": ({"id": "cf-1", "status": ["accepted"]}, "status a list is not one of"),
    "long-status": ({"id": "cf-1", "status": "x" * 500_000}, "is not one of"),
    "many-keys": ({f"key{i}": 1 for i in range(20_000)}, "unknown keys ['key0', 'key1'"),
    "many-fields": (
        {"id": "adv-4", "status": "edited", "fields": {f"f{i}": "x" for i in range(20_000)}},
        "unknown field",
    ),
    "long-array": ([1] * 100_000, "must be a JSON object {id, status, fields}, not a list"),
}


@pytest.mark.parametrize(("body", "problem"), MALFORMED.values(), ids=list(MALFORMED))
def test_malformed_post_is_a_one_line_400(
    review_dir: Path,
    body: object,
    problem: str,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER), serve(review_dir) as server:
        status, answer = _request(server.url, "POST", "/decisions", body)
        error = json.loads(answer)["error"]
        assert status == 400 and problem in error
        assert "\n" not in error and len(error) <= 300
        assert not (review_dir / DECISIONS_FILE).exists()
        # the server goes on serving
        assert _request(server.url, "POST", "/decisions", {"id": "cf-1", "status": "accepted"})[0] == 200
    assert read_decisions(review_dir) == {"cf-1": DECISIONS["cf-1"]}
    assert not _problems(caplog) and "Traceback" not in capfd.readouterr().err


def _post_header_only(url: str, length: str) -> tuple[int, str]:
    """A POST that announces `length` bytes and sends none (so the server's refusal is read cleanly)."""
    conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1].strip("/")), timeout=5)
    conn.putrequest("POST", "/decisions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", length)
    conn.endheaders()
    response = conn.getresponse()
    result = response.status, json.loads(response.read())["error"]
    conn.close()
    return result


@pytest.mark.parametrize(
    ("length", "status", "problem"),
    [
        ("2000000", 413, "body too large: at most 1048576 bytes"),
        ("9" * 5000, 413, "body too large: at most 1048576 bytes"),
        ("-5", 400, "bad Content-Length '-5'"),
        ("twelve", 400, "bad Content-Length 'twelve'"),
    ],
)
def test_bad_content_length_is_refused(review_dir: Path, length: str, status: int, problem: str) -> None:
    with serve(review_dir) as server:
        assert _post_header_only(server.url, length) == (status, problem)
        assert _request(server.url, "GET", "/decisions")[0] == 200


def test_client_hanging_up_leaves_no_traceback(
    review_dir: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    with caplog.at_level(logging.DEBUG, logger=LOGGER), serve(review_dir) as server:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as client:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close: RST
                client.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
        # each request is answered (its access line) and its reset is seen while the server writes
        # or reads the next request ("went away"); which one depends on when the RST lands, so wait
        # for all three answers and give the reads a moment
        answered = lambda: sum('"GET / HTTP/1.1" 200' in r.getMessage() for r in caplog.records)  # noqa: E731
        _wait_for(lambda: answered() == 3 or bool(_problems(caplog)))
        time.sleep(0.5)
        assert _request(server.url, "GET", "/decisions")[0] == 200
    assert not _problems(caplog) and "Traceback" not in capfd.readouterr().err


def test_unexpected_error_is_500_and_one_log_line(
    review_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    def broken(self: object) -> str:
        raise RuntimeError("the page broke\non two lines")

    monkeypatch.setattr(review._ReviewState, "page", broken)
    with caplog.at_level(logging.WARNING, logger=LOGGER), serve(review_dir) as server:
        status, body = _request(server.url, "GET", "/")
        assert (status, json.loads(body)) == (500, {"error": "server error (RuntimeError)"})
        assert _request(server.url, "GET", "/decisions")[0] == 200
    [record] = _problems(caplog)
    assert record.levelno == logging.ERROR and record.exc_info is None
    assert record.getMessage() == (
        "review server: 'GET / HTTP/1.1' failed: RuntimeError: the page broke on two lines"
    )
    assert "Traceback" not in capfd.readouterr().err


# ---------------------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless system Chromium driven by Playwright (no browser download)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; the system Chromium is used)")
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS), headless=True)
        yield chromium
        chromium.close()


def _open(browser: Any, url: str) -> Any:
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    page.set_default_timeout(10_000)
    page.goto(url)
    assert page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
    return page


def test_browser_served_review(browser: Any, review_dir: Path) -> None:
    from playwright.sync_api import expect

    with serve(review_dir) as server:
        page = _open(browser, server.url)
        cards = page.locator("section.item")
        expect(cards).to_have_count(4)
        expect(cards.nth(1).locator("textarea")).to_have_value(NASTY)
        cards.nth(0).get_by_role("button", name="Accept").click()
        cards.nth(1).get_by_role("button", name="Reject").click()
        page.keyboard.press("j")
        expect(cards.nth(2)).to_have_class(re.compile(r"\bcurrent\b"))
        page.keyboard.press("a")  # accepts item 3 and moves on to item 4
        expect(cards.nth(3)).to_have_class(re.compile(r"\bcurrent\b"))

        answer = cards.nth(3).locator('textarea[data-field="answer"]')
        page.keyboard.press("e")
        expect(cards.nth(3).locator('textarea[data-field="question"]')).to_be_focused()
        answer.fill("typed, then abandoned")
        page.keyboard.press("Escape")  # cancel: the value comes back, nothing is decided
        expect(answer).to_have_value("Lyon")
        expect(cards.nth(3).locator(".status")).to_have_text("undecided")

        cards.nth(3).get_by_role("button", name="Edit").click()
        answer.fill("Paris")
        cards.nth(3).get_by_role("button", name="Save").click()
        expect(page.locator("#progress")).to_have_text("4/4")
        expect(page.locator("#saved")).to_have_text("all saved")
        expect(cards.nth(3).locator(".status")).to_have_text("edited")

        assert read_decisions(review_dir) == {
            "cf-1": Decision("accepted", {}),
            "rp-2": Decision("rejected", {}),
            "mh-3": Decision("accepted", {}),
            "adv-4": Decision("edited", {"answer": "Paris"}),
        }
        page.reload()  # the server's page starts from what it saved
        expect(page.locator("#progress")).to_have_text("4/4")
        expect(answer).to_have_value("Paris")

    # the server is gone: the page says so and shows the decision the file still holds
    cards.nth(0).get_by_role("button", name="Reject").click()
    expect(page.locator("#saved")).to_have_text("some decisions failed to save")
    expect(cards.nth(0).locator(".saved")).to_contain_text("failed")
    expect(cards.nth(0).locator(".status")).to_have_text("accepted")
    page.close()


def test_browser_static_download(browser: Any, review_dir: Path, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page = _open(browser, write_static(review_dir).as_uri())
    cards = page.locator("section.item")
    cards.nth(0).get_by_role("button", name="Accept").click()
    cards.nth(1).click()
    page.keyboard.press("e")
    cards.nth(1).locator("textarea").fill("Who painted the water lilies?")
    page.keyboard.press("Enter")  # Enter commits an edit
    expect(page.locator("#progress")).to_have_text("2/4")
    with page.expect_download() as download:
        page.get_by_role("button", name="Download decisions").click()
    assert download.value.suggested_filename == DECISIONS_FILE
    target = tmp_path / "downloaded"
    target.mkdir()
    download.value.save_as(target / DECISIONS_FILE)
    assert read_decisions(target) == {
        "cf-1": Decision("accepted", {}),
        "rp-2": Decision("edited", {"question": "Who painted the water lilies?"}),
    }
    page.close()
