"""``mmke chat``: a tiny LLaVA and an edited copy answer side by side, in a real pseudo-terminal
(readline, Ctrl-D, Ctrl-C) and through a pipe; bad images and bad starts are one line."""

from __future__ import annotations

import argparse
import fcntl
import io
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from rich.console import Console

from mmke.chat import Session, cmd_chat, load_models, open_picture, printable, run, shown_answer
from mmke.data.images import ImageStore
from mmke.errors import ConfigError, MmkeError, ModelLoadError
from mmke.models import LVLM
from mmke.models.tiny import save_tiny, tiny_model
from mmke.types import ImageRef, Sample

MAX_NEW = 8
QUESTION = "What colour is this?"
#: Enough for a start (imports, two model loads) on a busy 2-core machine; a hang fails here.
START_S = 60
STEP_S = 20


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny LLaVA saved, a copy with every weight nudged (the "edited" model), and a red image."""
    root = tmp_path_factory.mktemp("chat")
    save_tiny(tiny_model("llava", seed=0), root / "base")
    edited = tiny_model("llava", seed=0)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in edited.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=noise))
    save_tiny(edited, root / "edited")
    Image.new("RGB", (32, 32), (220, 20, 20)).save(root / "red.png")
    return root / "base", root / "edited", root / "red.png"


def _generated(folder: Path, question: str, image: Path | None) -> str:
    """The model's own greedy answer, asked in this process as any mmke code would ask it."""
    store = None if image is None else ImageStore(image.parent)
    ref = None if image is None else ImageRef(image.name)
    model = LVLM.load(folder, images=store)
    return model.generate([Sample(question, "", ref)], max_new_tokens=MAX_NEW)[0]


# ------------------------------------------------------------------ a real terminal


def _chat_command(base: Path, edited: Path, image: Path) -> list[str]:
    """``mmke chat`` as a user types it (through the CLI's own entry point)."""
    chat = [
        "chat",
        str(base),
        "--edited",
        str(edited),
        "--image",
        str(image),
        "--max-new-tokens",
        str(MAX_NEW),
    ]
    return [sys.executable, "-c", "import sys; from mmke.cli import main; sys.exit(main())", *chat]


_ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07]*\x07|[()][0-9A-Za-z]|[=>])")


class Terminal:
    """A command on a pseudo-terminal of its own (its controlling terminal, 200 columns), as typed at."""

    def __init__(self, argv: list[str]) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
        env |= {"TERM": "xterm", "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
        env |= {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
            preexec_fn=_take_terminal,
        )
        os.close(slave)
        self.raw = b""

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def screen(self) -> str:
        """Everything shown so far, without colour or cursor codes, one ``\\n`` per line."""
        text = _ESCAPES.sub("", self.raw.decode("utf-8", errors="replace"))
        return text.replace("\r\n", "\n").replace("\r", "")

    def wait_for(self, done: Callable[[str], bool], timeout: float) -> str:
        """Read until ``done(screen)``; a timeout or an early exit fails with what was shown."""
        deadline = time.monotonic() + timeout
        while not done(self.screen()):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout} s; the terminal shows:\n{self.screen()}")
            if not self._read(left):
                raise AssertionError(f"the session ended early; the terminal shows:\n{self.screen()}")
        return self.screen()

    def finish(self, timeout: float) -> int:
        """Read to the end and return the exit code."""
        deadline = time.monotonic() + timeout
        while self._read(max(deadline - time.monotonic(), 0.01)):
            if time.monotonic() > deadline:
                raise AssertionError(f"still running after {timeout} s:\n{self.screen()}")
        return self.proc.wait(timeout=max(deadline - time.monotonic(), 1))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)

    def _read(self, timeout: float) -> bool:
        """One read; False once the other side has closed the terminal."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: every process holding the terminal has exited
            return False
        self.raw += chunk
        return bool(chunk)


def _take_terminal() -> None:
    """In the child, after setsid: make the pty its controlling terminal, so Ctrl-C sends SIGINT."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def terminal(folders: tuple[Path, Path, Path]) -> Iterator[Terminal]:
    term = Terminal(_chat_command(*folders))
    yield term
    term.close()


def _ready(count: int) -> Callable[[str], bool]:
    """The screen ends at the ``count``-th prompt, waiting for input."""
    return lambda screen: screen.endswith("> ") and screen.count("\n> ") + screen.startswith("> ") >= count


def _answers(screen: str, after: str) -> dict[str, str]:
    """The labelled answer lines printed after the last ``after`` line."""
    lines = screen.split("\n")
    start = max(i for i, line in enumerate(lines) if line.rstrip() == after)
    rows = [line.rstrip().split(None, 1) for line in lines[start + 1 :]]
    return {
        row[0]: row[1] if len(row) > 1 else "" for row in rows if row and row[0] in ("unedited", "edited")
    }


def test_session_in_a_terminal(folders: tuple[Path, Path, Path], terminal: Terminal) -> None:
    base, edited, image = folders
    want = {
        "unedited": printable(_generated(base, QUESTION, image)),
        "edited": printable(_generated(edited, QUESTION, image)),
    }
    assert want["unedited"] != want["edited"], "the nudged copy should answer differently"
    assert "\n" not in "".join(want.values()), "pick a question whose answers are one line each"

    terminal.wait_for(_ready(1), START_S)
    terminal.type(QUESTION + "\r")
    screen = terminal.wait_for(_ready(2), STEP_S)
    assert _answers(screen, f"> {QUESTION}") == want

    terminal.type(":image /no/such/picture.png\r")
    screen = terminal.wait_for(_ready(3), STEP_S)
    after = screen.split("> :image /no/such/picture.png\n", 1)[1]
    assert after == "error: /no/such/picture.png: no such image file\n> "  # one line, then the prompt

    terminal.type(QUESTION + "\r")  # the session goes on, still about the red image
    screen = terminal.wait_for(_ready(4), STEP_S)
    assert _answers(screen, f"> {QUESTION}") == want

    terminal.type("\x04")  # Ctrl-D
    assert terminal.finish(STEP_S) == 0
    assert "Traceback" not in terminal.screen()


def test_ctrl_c_ends_the_session(terminal: Terminal) -> None:
    terminal.wait_for(_ready(1), START_S)
    terminal.type("half a quest")
    terminal.wait_for(lambda screen: screen.endswith("> half a quest"), STEP_S)
    # readline has echoed it and is waiting again (a SIGINT in the instant before CPython's
    # readline waits is only noticed at the next key: a race no person's Ctrl-C meets)
    time.sleep(0.2)
    terminal.type("\x03")  # Ctrl-C: the terminal sends SIGINT
    assert terminal.finish(STEP_S) == 0
    screen = terminal.screen()
    assert "Traceback" not in screen and "KeyboardInterrupt" not in screen


# ------------------------------------------------------------------ in this process


@pytest.fixture(scope="module")
def models(folders: tuple[Path, Path, Path]) -> list:
    base, edited, _ = folders
    return load_models(str(base), edited)


def _session(models: list, image: Path | None) -> tuple[Session, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, width=80, color_system=None)
    picture = None if image is None else open_picture(image)
    return Session(models, picture, console, MAX_NEW), out


def _reader(lines: list[str]) -> Callable[[str], str]:
    """``input()`` over ``lines``: each line once, then end of input (Ctrl-D)."""
    pending = iter(lines)

    def read(prompt: str) -> str:
        line = next(pending, None)
        if line is None:
            raise EOFError
        return line

    return read


def test_pipe_transcript_commands_and_text_only_questions(
    folders: tuple[Path, Path, Path], models: list
) -> None:
    base, edited, image = folders
    session, out = _session(models, image)
    lines = [":bogus", ":help", ":image", ":noimage", "Hello there", ":quit", "never read"]
    read = _reader(lines)
    run(session, read, echo=True)
    shown = out.getvalue()
    assert "unknown command ':bogus' (:help lists them)" in shown
    assert ":image PATH   ask about another image from now on" in shown
    assert "usage: :image PATH" in shown
    assert session.picture is None
    assert _answers(shown, "> Hello there") == {
        "unedited": printable(_generated(base, "Hello there", None)),
        "edited": printable(_generated(edited, "Hello there", None)),
    }
    assert "> :quit" in shown and "never read" not in shown
    assert read("") == "never read"  # :quit stopped reading before it


def test_ctrl_c_while_reading_ends_quietly(folders: tuple[Path, Path, Path], models: list) -> None:
    session, out = _session(models, folders[2])

    def interrupted(prompt: str) -> str:
        raise KeyboardInterrupt

    run(session, interrupted)
    assert out.getvalue() == "\n"


def test_a_bad_image_is_refused_and_the_old_one_kept(
    folders: tuple[Path, Path, Path], models: list, tmp_path: Path
) -> None:
    session, out = _session(models, folders[2])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    session.handle(f":image {tmp_path / 'broken.png'}")
    session.handle(f":image {tmp_path}")
    broken = tmp_path.resolve() / "broken.png"  # the store opens it under its real folder
    assert out.getvalue().splitlines() == [
        f"error: {broken}: image 'broken.png' is corrupt or truncated (UnidentifiedImageError)",
        f"error: {tmp_path}: not a file (give an image file)",
    ]
    assert session.picture is not None and session.picture.path == folders[2]


def _args(**given: object) -> argparse.Namespace:
    defaults = {"edited": None, "image": None, "max_new_tokens": MAX_NEW, "dtype": None, "device": "cpu"}
    return argparse.Namespace(**(defaults | given))


def test_bad_starts_are_one_line_errors(folders: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, _, image = folders
    console = Console(file=io.StringIO())
    with pytest.raises(MmkeError, match=r"^/no/such\.png: no such image file$"):
        cmd_chat(_args(model=str(base), image="/no/such.png"), console)
    with pytest.raises(ModelLoadError, match=re.escape(str(tmp_path / "missing"))):
        cmd_chat(_args(model=str(tmp_path / "missing"), image=str(image)), console)
    with pytest.raises(ModelLoadError, match=re.escape(str(tmp_path / "gone"))):
        cmd_chat(_args(model=str(base), edited=tmp_path / "gone", image=str(image)), console)
    with pytest.raises(ConfigError, match="--max-new-tokens must be at least 1"):
        cmd_chat(_args(model=str(base), max_new_tokens=0), console)


def test_a_pair_answers_in_the_edited_models_dtype(folders: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, _, _ = folders
    save_tiny(LVLM.load(base, dtype="bfloat16"), tmp_path / "bf16")  # as if edited in bfloat16
    assert [_lvlm_dtype(m) for m in load_models(str(base), tmp_path / "bf16")] == [torch.bfloat16] * 2
    assert [_lvlm_dtype(m) for m in load_models(str(base), None)] == [torch.float32]
    pair = load_models(str(base), tmp_path / "bf16", dtype="float32")
    assert [_lvlm_dtype(m) for m in pair] == [torch.float32] * 2


def _lvlm_dtype(model: object) -> torch.dtype:
    assert isinstance(model, LVLM)
    return model.dtype


def test_printable_shows_control_characters_as_escapes() -> None:
    assert printable("  \x1b[31mred\rX\u202eY\x10 é\n2 ") == "\\x1b[31mred\\rX\\u202eY\\x10 é\n2"


def test_the_first_answer_is_plain_and_the_rest_dimmed() -> None:
    shown = shown_answer(" Fort Smith. It is in\x1b Arkansas\n")
    assert shown.plain == printable(" Fort Smith. It is in\x1b Arkansas\n")
    dimmed = [shown.plain[span.start : span.end] for span in shown.spans if span.style == "dim"]
    assert dimmed == [". It is in\\x1b Arkansas"]
    assert shown_answer(" \n").plain == "(nothing)"


def test_mmke_chat_bad_start_is_one_line(
    folders: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from mmke.cli import main

    assert main(["chat", str(folders[0]), "--image", "/no/such.png"]) == 2
    assert capsys.readouterr().err == "mmke: error: /no/such.png: no such image file\n"
