"""``mmke chat``: ask a model, and an edited copy of it, questions about one image in the terminal.

Each question is answered greedily by both models and shown side by side, so an edit can be
tried by hand before (or after) it is measured: does the edited model say the new answer, and
does it still answer unrelated questions as the unedited one does?
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.table import Table
from rich.text import Text

from mmke.data.checks import FieldError, check_text
from mmke.data.images import ImageStore
from mmke.errors import ConfigError, MmkeError
from mmke.eval import first_answer
from mmke.models import LVLM
from mmke.types import ImageRef, Sample

HELP = """\
Type a question and press Enter: every model answers it about the current image.
  :image PATH   ask about another image from now on
  :noimage      ask text-only questions (no image) from now on
  :help         this text
  :quit         end the session (so do Ctrl-D and Ctrl-C)"""

#: What each answer is labelled with: a model alone, or the unedited and the edited one.
ALONE = ("answer",)
PAIR = ("unedited", "edited")


class Answerer(Protocol):
    """What a chat asks: an ``LVLM`` or an ``Edited`` handle (``mmke.saving.load_edited``'s result)."""

    def generate(self, items: Sequence[Sample], *, max_new_tokens: int = 16) -> list[str]: ...


@dataclass(frozen=True)
class Picture:
    """The image questions are about: a store rooted at its folder, and its name in that folder."""

    path: Path
    store: ImageStore
    ref: ImageRef


def open_picture(path: str | Path) -> Picture:
    """``path`` checked (a file that decodes as an image) and ready for a model; ``MmkeError`` if not."""
    given = Path(path).expanduser()
    if not given.exists():
        raise MmkeError(f"{given}: no such image file")
    if not given.is_file():
        raise MmkeError(f"{given}: not a file (give an image file)")
    # resolved first so the store's root is the real folder: a symlink into another folder is fine here
    real = given.resolve()
    picture = Picture(given, ImageStore(real.parent, capacity=1), ImageRef(real.name))
    picture.store.open(picture.ref)  # decodes it now (BadRecordError names the file) and keeps it
    return picture


def load_models(
    model: str, edited: Path | None, *, dtype: str | None = None, device: str = "cpu"
) -> list[Answerer]:
    """The unedited model, then the edited one when ``edited`` is given (``ModelLoadError`` if one is bad).

    Without ``dtype`` a model alone loads in float32 (as ``mmke run`` and ``mmke edit`` do), and
    a pair in the edited model's dtype as it was saved, so both answer in the same precision.
    """
    if edited is None:
        return [LVLM.load(model, dtype=dtype or "float32", device=device)]
    from mmke.saving import load_edited

    changed: Answerer = load_edited(edited, dtype=dtype, device=device)
    same = dtype or str(_lvlm(changed).dtype).removeprefix("torch.")
    return [LVLM.load(model, dtype=same, device=device), changed]


def bind_picture(models: Sequence[Answerer], picture: Picture | None) -> None:
    """Let every model open ``picture`` (None: text-only questions)."""
    for answerer in models:
        _lvlm(answerer).bind_images(None if picture is None else picture.store)


def _lvlm(answerer: Answerer) -> LVLM:
    """The loaded model behind ``answerer``: itself, or the model an ``Edited`` handle edits."""
    model: Any = answerer if isinstance(answerer, LVLM) else getattr(answerer, "model", None)
    if not isinstance(model, LVLM):
        raise TypeError(f"{type(answerer).__name__} is neither an LVLM nor an edit of one")
    return model


def printable(answer: str) -> str:
    """``answer`` safe to print: control and format characters (a model can emit terminal escape
    codes, carriage returns, bidi overrides) shown as escapes, surrounding whitespace dropped."""
    return _escaped(answer.strip())


def _escaped(text: str) -> str:
    return "".join(_visible(ch) for ch in text)


def _visible(ch: str) -> str:
    if ch == "\n" or unicodedata.category(ch) not in ("Cc", "Cf", "Cs"):
        return ch
    return ch.encode("unicode_escape").decode("ascii")


def shown_answer(answer: str) -> Text:
    """``printable(answer)``, its first answer (where the evaluation cuts it) plain and what the
    model went on to say dimmed."""
    text = answer.strip()
    if not text:
        return Text("(nothing)", style="dim")
    first = first_answer(text)  # a prefix of ``text``: the first line, up to a sentence end
    return Text(_escaped(first)) + Text(_escaped(text[len(first) :]), style="dim")


def answers_table(labels: Sequence[str], answers: Sequence[str]) -> Table:
    """One line per model, ``label  answer``; a long answer wraps under itself, so 80 columns do."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for label, answer in zip(labels, answers, strict=True):
        table.add_row(label, shown_answer(answer))
    return table


class Session:
    """One chat: the models, the current picture and the console answers are printed on."""

    def __init__(
        self, models: Sequence[Answerer], picture: Picture | None, console: Console, max_new_tokens: int
    ) -> None:
        self.models = list(models)
        self.labels = PAIR if len(self.models) == 2 else ALONE
        if len(self.labels) != len(self.models):
            raise ValueError(f"a chat takes one or two models, not {len(self.models)}")
        self.console = console
        self.max_new_tokens = max_new_tokens
        self.picture = picture
        bind_picture(self.models, picture)
        self._commands: dict[str, Callable[[str], bool]] = {
            ":image": self.switch_image,
            ":noimage": self.drop_image,
            ":help": self.show_help,
            ":quit": lambda _: False,
        }

    def handle(self, line: str) -> bool:
        """Answer a question or run a command; False when the session should end."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith(":"):
            self.ask(line)
            return True
        name, _, rest = line.partition(" ")
        command = self._commands.get(name)
        if command is None:
            self.say(f"unknown command {name!r} (:help lists them)")
            return True
        return command(rest.strip())

    def ask(self, question: str) -> None:
        """Print every model's greedy answer to ``question`` about the current picture."""
        try:
            image = None if self.picture is None else self.picture.ref
            item = Sample(check_text(question, "question"), "", image)
            answers = [m.generate([item], max_new_tokens=self.max_new_tokens)[0] for m in self.models]
        except (MmkeError, FieldError) as e:  # a prompt too long, an image this model cannot take
            self.say(f"error: {e}")
            return
        self.console.print(answers_table(self.labels, answers))

    def switch_image(self, path: str) -> bool:
        if not path:
            self.say("usage: :image PATH")
            return True
        try:
            picture = open_picture(path)
        except MmkeError as e:  # a bad image is one line; the current one stays
            self.say(f"error: {e}")
            return True
        self.picture = picture
        bind_picture(self.models, picture)
        self.say(f"image: {picture.path}")
        return True

    def drop_image(self, _: str) -> bool:
        self.picture = None
        bind_picture(self.models, None)
        self.say("no image: questions are text-only (:image PATH to ask about one again)")
        return True

    def show_help(self, _: str) -> bool:
        self.say(HELP)
        return True

    def say(self, text: str) -> None:
        # soft wrap: a long path stays one line (the terminal wraps it), whole when copied
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)


def run(session: Session, read: Callable[[str], str] = input, *, echo: bool = False) -> None:
    """Read lines with ``read`` until ``:quit``, end of input or Ctrl-C, handling each.

    ``echo``: print each question after the prompt (reading from a pipe shows neither, and
    a transcript is easier to read with both).
    """
    prompt = "" if echo else "> "
    with contextlib.suppress(EOFError, KeyboardInterrupt):
        while True:
            try:
                line = read(prompt)
            except UnicodeDecodeError:
                session.say("error: that line is not valid text in this terminal's encoding")
                continue
            if echo:
                session.say(f"> {_escaped(line)}")
            if not session.handle(line):
                return
    if not echo:
        session.console.print()  # Ctrl-D or Ctrl-C left the cursor after the prompt


def cmd_chat(args: argparse.Namespace, console: Console) -> int:
    """``mmke chat MODEL [--edited DIR] [--image PATH]``: a terminal session; errors at start raise."""
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
    # the image first: a typo there should not cost a model load
    picture = None if args.image is None else open_picture(args.image)
    models = load_models(args.model, args.edited, dtype=args.dtype, device=args.device)
    session = Session(models, picture, console, args.max_new_tokens)
    interactive = sys.stdin.isatty()
    if interactive:
        _enable_history()
    _greet(session, args)
    run(session, echo=not interactive)
    return 0


def _greet(session: Session, args: argparse.Namespace) -> None:
    edited = f" and {args.edited} (edited)" if args.edited is not None else ""
    image = f"about {session.picture.path}" if session.picture else "text-only"
    session.say(f"mmke chat: {args.model}{edited}, {image}")
    session.say("greedy answers; :help for commands, Ctrl-D to end")


def _enable_history() -> None:
    """Line editing and an in-session history (arrow keys) for ``input()``, where readline exists."""
    with contextlib.suppress(ImportError):  # not on Windows; plain input() still works there
        import readline  # noqa: F401  (importing it is what hooks it into input())
