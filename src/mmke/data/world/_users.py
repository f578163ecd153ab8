"""User-specific knowledge (MMKE-Bench): personal pets and items the world model knows nothing about.

Each item is one (owner, kind) pair, e.g. "the dog of my sister", with a fresh invented name and a
procedural picture in a home scene. No fact about these items enters the training corpus, so an
edit that writes "its name is bruno" is an insertion (no ground truth); only the names themselves
do, as bare words (``_corpus.lexicon_samples``), as a real LLM knows the word "bruno".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from mmke.data.world._common import permuted
from mmke.data.world._names import NamePool
from mmke.data.world._render import Painter, View, ellipse, jitter, rect, regular
from mmke.data.world._visual import PALETTE

OWNERS = (
    "me",
    "my sister",
    "my brother",
    "my mother",
    "my father",
    "my aunt",
    "my uncle",
    "my cousin",
    "my friend",
    "my neighbour",
    "my boss",
    "my teacher",
    "my son",
    "my daughter",
    "my wife",
    "my husband",
)
PETS = ("dog", "cat", "bird", "fish", "rabbit", "horse")
THINGS = ("bike", "car", "mug", "hat", "lamp", "bag")
KINDS = PETS + THINGS
_WALLS = ((235, 225, 205), (210, 225, 235), (225, 235, 215), (240, 215, 215))
_FLOORS = ((150, 110, 70), (120, 120, 130), (170, 150, 120), (100, 80, 60))


@dataclass(frozen=True)
class UserItem:
    """A personal pet or item: who owns it, what it is, its (new) name and how it looks."""

    id: str
    owner: str
    kind: str
    name: str
    spec: dict[str, int]

    @property
    def phrase(self) -> str:
        """How the user refers to it: "my dog", "the dog of my sister"."""
        return f"my {self.kind}" if self.owner == "me" else f"the {self.kind} of {self.owner}"

    @property
    def category(self) -> str:
        return "animal" if self.kind in PETS else "object"


def make_user_items(n: int, rng: np.random.Generator, names: NamePool) -> tuple[UserItem, ...]:
    """``n`` distinct (owner, kind) items with fresh names and looks, in a seeded order."""
    pairs = permuted(rng, [(o, k) for o in OWNERS for k in KINDS])[:n]
    items = []
    for i, (owner, kind) in enumerate(pairs):
        main = int(rng.integers(8))
        spec = {
            "kind": KINDS.index(kind),
            "main": main,
            "accessory": int((main + 1 + rng.integers(9)) % 10),  # never the main colour
            "wall": int(rng.integers(len(_WALLS))),
            "floor": int(rng.integers(len(_FLOORS))),
        }
        items.append(UserItem(f"user-{i:04d}", owner, kind, names.word(2), spec))
    return tuple(items)


def render_user_item(spec: dict[str, int], view: View, size: int, rng: np.random.Generator) -> Image.Image:
    """One photo of a personal pet or item in a room (wall, floor)."""
    wall = jitter(_WALLS[spec["wall"]], rng)
    p = Painter(size, wall, view)  # type: ignore[arg-type]
    p.poly(rect(-1.5, 0.6, 1.5, 1.6), _FLOORS[spec["floor"]])
    _DRAW[KINDS[spec["kind"]]](p, PALETTE[spec["main"]], PALETTE[spec["accessory"]])  # type: ignore[arg-type]
    return p.finish(view, rng)


_INK = (40, 35, 35)


def _dog(p: Painter, c: tuple, a: tuple) -> None:
    p.poly(ellipse(-0.1, 0.2, 0.6, 0.33), c)
    for x in (-0.5, -0.25, 0.1, 0.3):
        p.poly(rect(x, 0.35, x + 0.13, 0.85), c)
    p.poly(ellipse(0.55, -0.25, 0.28, 0.25), c)
    p.poly(ellipse(0.4, -0.15, 0.1, 0.25), _INK)  # floppy ear
    p.poly(rect(0.32, 0.0, 0.5, 0.12), a)  # collar
    p.poly([(-0.68, 0.1), (-0.95, -0.3), (-0.85, -0.35), (-0.6, 0.0)], c)


def _cat(p: Painter, c: tuple, a: tuple) -> None:
    p.poly(ellipse(-0.1, 0.3, 0.5, 0.3), c)
    p.poly(ellipse(0.45, -0.15, 0.27, 0.25), c)
    p.poly([(0.25, -0.3), (0.3, -0.62), (0.45, -0.35)], c)
    p.poly([(0.5, -0.35), (0.62, -0.62), (0.68, -0.28)], c)
    p.poly([(-0.58, 0.3), (-0.9, -0.5), (-0.8, -0.55), (-0.5, 0.2)], c)
    p.poly(rect(0.25, 0.05, 0.6, 0.15), a)


def _bird(p: Painter, c: tuple, a: tuple) -> None:
    p.poly(ellipse(0.0, 0.1, 0.45, 0.38), c)
    p.poly(ellipse(0.35, -0.35, 0.22, 0.22), c)
    p.poly([(0.55, -0.38), (0.85, -0.3), (0.55, -0.25)], (240, 180, 40))
    p.poly(ellipse(-0.05, 0.1, 0.3, 0.18), a)  # wing
    p.poly(rect(-0.05, 0.45, 0.0, 0.75), _INK)
    p.poly(rect(0.12, 0.45, 0.17, 0.75), _INK)


def _fish(p: Painter, c: tuple, a: tuple) -> None:
    p.poly(rect(-1.0, -0.6, 1.0, 0.55), (150, 200, 230))  # the bowl water
    p.poly(ellipse(0.0, 0.0, 0.5, 0.28), c)
    p.poly([(-0.45, 0.0), (-0.85, -0.3), (-0.85, 0.3)], a)
    p.poly(ellipse(0.3, -0.05, 0.06, 0.06, 8), _INK)


def _rabbit(p: Painter, c: tuple, a: tuple) -> None:
    p.poly(ellipse(-0.1, 0.35, 0.45, 0.35), c)
    p.poly(ellipse(0.35, -0.1, 0.25, 0.23), c)
    p.poly(ellipse(0.25, -0.6, 0.07, 0.3), c)
    p.poly(ellipse(0.45, -0.6, 0.07, 0.3), c)
    p.poly(ellipse(-0.55, 0.3, 0.12, 0.12, 10), a)  # tail


def _horse(p: Painter, c: tuple, a: tuple) -> None:
    p.poly(ellipse(-0.15, 0.0, 0.6, 0.3), c)
    for x in (-0.6, -0.4, 0.1, 0.3):
        p.poly(rect(x, 0.15, x + 0.12, 0.9), c)
    p.poly([(0.3, -0.1), (0.55, -0.7), (0.75, -0.6), (0.5, 0.05)], c)
    p.poly(ellipse(0.75, -0.62, 0.22, 0.12), c)
    p.poly([(0.3, -0.2), (0.5, -0.75), (0.55, -0.7), (0.38, -0.15)], a)  # mane


def _bike(p: Painter, c: tuple, a: tuple) -> None:
    for x in (-0.55, 0.55):
        p.poly(ellipse(x, 0.35, 0.38, 0.38), _INK)
        p.poly(ellipse(x, 0.35, 0.3, 0.3), (230, 230, 230))
    for u, v in (
        ((-0.55, 0.35), (0.0, 0.35)),
        ((0.0, 0.35), (0.3, -0.2)),
        ((-0.55, 0.35), (-0.2, -0.2)),
        ((-0.2, -0.2), (0.3, -0.2)),
        ((0.3, -0.2), (0.55, 0.35)),
    ):
        p.line(u, v, c, 0.1)
    p.poly(rect(-0.35, -0.35, -0.05, -0.25), a)  # saddle


def _car(p: Painter, c: tuple, a: tuple) -> None:
    p.poly(rect(-0.9, -0.05, 0.9, 0.45), c)
    p.poly([(-0.5, -0.05), (-0.3, -0.45), (0.35, -0.45), (0.55, -0.05)], c)
    p.poly(rect(-0.9, 0.1, 0.9, 0.2), a)
    for x in (-0.5, 0.5):
        p.poly(ellipse(x, 0.5, 0.2, 0.2), _INK)


def _mug(p: Painter, c: tuple, a: tuple) -> None:
    p.poly(ellipse(0.45, 0.1, 0.3, 0.3), c)
    p.poly(ellipse(0.45, 0.1, 0.17, 0.17), p.img.getpixel((1, 1)))  # handle hole shows the wall
    p.poly(rect(-0.45, -0.45, 0.45, 0.6), c)
    p.poly(rect(-0.45, -0.1, 0.45, 0.05), a)


def _hat(p: Painter, c: tuple, a: tuple) -> None:
    p.poly(ellipse(0.0, 0.35, 0.9, 0.2), c)
    p.poly(rect(-0.45, -0.45, 0.45, 0.35), c)
    p.poly(rect(-0.45, 0.1, 0.45, 0.25), a)


def _lamp(p: Painter, c: tuple, a: tuple) -> None:
    p.poly([(-0.5, -0.1), (-0.25, -0.7), (0.25, -0.7), (0.5, -0.1)], c)
    p.poly(rect(-0.05, -0.1, 0.05, 0.6), _INK)
    p.poly(ellipse(0.0, 0.65, 0.35, 0.1), a)


def _bag(p: Painter, c: tuple, a: tuple) -> None:
    p.poly(regular(0.0, -0.3, 0.35, 16), _INK)
    p.poly(regular(0.0, -0.3, 0.26, 16), p.img.getpixel((1, 1)))
    p.poly(rect(-0.6, -0.25, 0.6, 0.6), c)
    p.poly(rect(-0.6, 0.05, 0.6, 0.18), a)


_DRAW = {
    "dog": _dog,
    "cat": _cat,
    "bird": _bird,
    "fish": _fish,
    "rabbit": _rabbit,
    "horse": _horse,
    "bike": _bike,
    "car": _car,
    "mug": _mug,
    "hat": _hat,
    "lamp": _lamp,
    "bag": _bag,
}
