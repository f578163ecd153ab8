"""Procedural pictures drawn with PIL: entity identities, signs and user-specific pets/items, in many views.

Everything is drawn as polygons in unit coordinates ([-1, 1], y down) and mapped through one
affine view transform, so rotation, scale and position change every part (patterns included)
consistently. Pictures are drawn at twice the size and box-filtered down for clean edges.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from mmke.data.world._visual import BACKGROUNDS, PALETTE, SIGN_BORDERS, SIGN_FILLS, SIGN_SYMBOL_COLOURS, Spec

RGB = tuple[int, int, int]
Points = list[tuple[float, float]]
_SUPER = 2  # supersampling factor


@dataclass(frozen=True)
class View:
    """One view: rotation (degrees), scale, shift (fraction of the image), colour shift, noise level."""

    angle: float = 0.0
    scale: float = 1.0
    dx: float = 0.0
    dy: float = 0.0
    tint: tuple[int, int, int] = (0, 0, 0)
    noise: float = 0.0


#: The near-canonical view: drawn as the entity is, the picture the benchmark's cases show.
CANONICAL_VIEW = 0
#: How far other views are turned (degrees), shifted (share of the side), tinted (levels per
#: channel) and specked (share of pixels, each moved by up to ``SPECK`` grey levels).
MAX_ANGLE, MAX_SHIFT, MAX_TINT, MAX_NOISE, SPECK = 20.0, 0.1, 14, 0.03, 60


def sample_view(rng: np.random.Generator, index: int) -> View:
    """View 0 is near-canonical; later views vary pose, scale, position, colour and noise."""
    if index == CANONICAL_VIEW:
        return View()
    return View(
        angle=float(rng.uniform(-MAX_ANGLE, MAX_ANGLE)),
        scale=float(rng.uniform(0.8, 1.05)),
        dx=float(rng.uniform(-MAX_SHIFT, MAX_SHIFT)),
        dy=float(rng.uniform(-MAX_SHIFT, MAX_SHIFT)),
        tint=tuple(int(v) for v in rng.integers(-MAX_TINT, MAX_TINT + 1, size=3)),  # type: ignore[arg-type]
        noise=float(rng.uniform(0.0, MAX_NOISE)),
    )


class Painter:
    """Draws unit-coordinate polygons onto a supersampled canvas through a view transform."""

    def __init__(self, size: int, background: RGB, view: View) -> None:
        self.px = size * _SUPER
        self.img = Image.new("RGB", (self.px, self.px), background)
        self.draw = ImageDraw.Draw(self.img)
        rad = math.radians(view.angle)
        self._cos, self._sin = math.cos(rad), math.sin(rad)
        self._k = self.px * 0.42 * view.scale
        self._cx = self.px / 2 + view.dx * self.px
        self._cy = self.px / 2 + view.dy * self.px

    def map(self, pts: Points) -> list[tuple[float, float]]:
        c, s, k = self._cos, self._sin, self._k
        return [(self._cx + k * (c * x - s * y), self._cy + k * (s * x + c * y)) for x, y in pts]

    def poly(self, pts: Points, colour: RGB) -> None:
        self.draw.polygon(self.map(pts), fill=colour)

    def line(self, a: tuple[float, float], b: tuple[float, float], colour: RGB, width: float) -> None:
        self.draw.line(self.map([a, b]), fill=colour, width=max(1, round(width * self._k)))

    def region(self, polys: list[Points], main: RGB, pattern: int, pattern_colour: RGB) -> None:
        """Fill ``polys`` with ``main`` and overlay a pattern clipped to them."""
        for p in polys:
            self.poly(p, main)
        mask = Image.new("L", self.img.size, 0)
        md = ImageDraw.Draw(mask)
        for p in polys:
            md.polygon(self.map(p), fill=255)
        pat = Image.new("L", self.img.size, 0)
        pd = ImageDraw.Draw(pat)
        xs, ys, ends = _pattern_points(pattern)
        # one vectorised view transform for a pattern's hundreds of points; same float ops as map()
        c, s, k = self._cos, self._sin, self._k
        px = (self._cx + k * (c * xs - s * ys)).tolist()
        py = (self._cy + k * (s * xs + c * ys)).tolist()
        start = 0
        for end in ends:
            pd.polygon(list(zip(px[start:end], py[start:end], strict=True)), fill=255)
            start = end
        self.img.paste(pattern_colour, mask=ImageChops.multiply(mask, pat))

    def finish(self, view: View, rng: np.random.Generator) -> Image.Image:
        """Downsample, shift colours and sprinkle sparse noise (sparse so PNGs stay small)."""
        small = self.img.resize((self.px // _SUPER, self.px // _SUPER), Image.Resampling.BOX)
        arr = np.asarray(small, dtype=np.int16) + np.asarray(view.tint, dtype=np.int16)  # (H, W, 3)
        if view.noise > 0:
            hit = rng.random(arr.shape[:2]) < view.noise  # (H, W)
            arr[hit] += rng.integers(-SPECK, SPECK + 1, size=(int(hit.sum()), 1), dtype=np.int16)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def jitter(colour: tuple[int, ...], rng: np.random.Generator) -> RGB:
    """``colour`` with each channel shifted by up to 12 (a view's background varies a little)."""
    return tuple(min(255, max(0, v + int(rng.integers(-12, 13)))) for v in colour)  # type: ignore[return-value]


# ---------------------------------------------------------------- shapes (unit coordinates)


def ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 24) -> Points:
    return [
        (cx + rx * math.cos(2 * math.pi * i / n), cy + ry * math.sin(2 * math.pi * i / n)) for i in range(n)
    ]


def regular(cx: float, cy: float, r: float, n: int, turn: float = -90.0) -> Points:
    t0 = math.radians(turn)
    return [
        (cx + r * math.cos(t0 + 2 * math.pi * i / n), cy + r * math.sin(t0 + 2 * math.pi * i / n))
        for i in range(n)
    ]


def rect(x0: float, y0: float, x1: float, y1: float) -> Points:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def star(cx: float, cy: float, r: float) -> Points:
    pts: Points = []
    for i in range(10):
        rr = r if i % 2 == 0 else r * 0.45
        t = math.radians(-90 + 36 * i)
        pts.append((cx + rr * math.cos(t), cy + rr * math.sin(t)))
    return pts


def cross(cx: float, cy: float, r: float) -> Points:
    a, b = r, r * 0.35
    return [
        (cx - b, cy - a),
        (cx + b, cy - a),
        (cx + b, cy - b),
        (cx + a, cy - b),
        (cx + a, cy + b),
        (cx + b, cy + b),
        (cx + b, cy + a),
        (cx - b, cy + a),
        (cx - b, cy + b),
        (cx - a, cy + b),
        (cx - a, cy - b),
        (cx - b, cy - b),
    ]


def accent_shape(kind: int, cx: float, cy: float, r: float) -> Points:
    """Six accent emblems: circle, triangle, square, diamond, star, cross."""
    shapes = (
        lambda: ellipse(cx, cy, r, r),
        lambda: regular(cx, cy, r * 1.15, 3),
        lambda: regular(cx, cy, r * 1.1, 4, 45),
        lambda: regular(cx, cy, r * 1.15, 4),
        lambda: star(cx, cy, r * 1.25),
        lambda: cross(cx, cy, r * 1.1),
    )
    return shapes[kind]()


def pattern_polys(kind: int) -> list[Points]:
    """Five patterns over [-1.3, 1.3]^2: horizontal / vertical / diagonal stripes, checker, dots."""
    span = [i * 0.4 - 1.4 for i in range(8)]
    if kind == 0:
        return [rect(-1.4, y, 1.4, y + 0.2) for y in span]
    if kind == 1:
        return [rect(x, -1.4, x + 0.2, 1.4) for x in span]
    if kind == 2:
        return [[(x - 1.6, -1.6), (x - 1.3, -1.6), (x + 1.6, 1.6), (x + 1.3, 1.6)] for x in [*span, 1.8, 2.2]]
    if kind == 3:
        cells = [i * 0.3 - 1.5 for i in range(10)]
        return [
            rect(x, y, x + 0.3, y + 0.3)
            for i, x in enumerate(cells)
            for j, y in enumerate(cells)
            if (i + j) % 2 == 0
        ]
    return [ellipse(x + 0.2, y + 0.2, 0.09, 0.09, 10) for x in span for y in span]


@functools.cache
def _pattern_points(kind: int) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """A pattern's polygons as flat x and y arrays and each polygon's end index (drawn per view)."""
    polys = pattern_polys(kind)
    pts = np.array([pt for poly in polys for pt in poly], dtype=np.float64)  # (P, 2)
    return pts[:, 0].copy(), pts[:, 1].copy(), tuple(itertools.accumulate(len(poly) for poly in polys))


# ---------------------------------------------------------------- entity figures

_SKIN = (235, 190, 150)
_DARK = (45, 40, 40)


def _colour(i: int) -> RGB:
    return PALETTE[i]  # type: ignore[return-value]


def _person(p: Painter, s: Spec) -> None:
    p.region(
        [[(-0.62, 0.98), (-0.45, 0.0), (0.45, 0.0), (0.62, 0.98)]],
        _colour(s["main"]),
        s["pattern"],
        _colour(s["pattern_colour"]),
    )
    p.poly(ellipse(0, -0.4, 0.3, 0.32), _SKIN)
    hair = [
        [],
        [rect(-0.34, -0.8, 0.34, -0.6)],
        [[(-0.3, -0.6), (0.0, -1.0), (0.3, -0.6)]],
        [ellipse(-0.33, -0.5, 0.13, 0.13, 12), ellipse(0.33, -0.5, 0.13, 0.13, 12)],
    ][s["variant"]]
    for h in hair:
        p.poly(h, _DARK)
    p.poly(accent_shape(s["accent_shape"], 0, 0.5, 0.3), _colour(s["accent_colour"]))


def _film(p: Painter, s: Spec) -> None:
    p.region([rect(-0.6, -0.92, 0.6, 0.92)], _colour(s["main"]), s["pattern"], _colour(s["pattern_colour"]))
    for x0 in (-0.9, 0.64):
        p.poly(rect(x0, -1.0, x0 + 0.26, 1.0), _DARK)
        for k in range(6):
            y = -0.9 + k * 0.33
            p.poly(rect(x0 + 0.08, y, x0 + 0.18, y + 0.14), (230, 230, 230))
    bars = [[-0.92], [0.62], [-0.92, 0.62], []][s["variant"]]
    for y in bars:
        p.poly(rect(-0.6, y, 0.6, y + 0.3), _DARK)
    p.poly(
        accent_shape(s["accent_shape"], 0, -0.15 if s["variant"] == 1 else 0.1, 0.32),
        _colour(s["accent_colour"]),
    )


def _organisation(p: Painter, s: Spec) -> None:
    outline = [
        ellipse(0, 0, 0.88, 0.88),
        [(-0.8, -0.85), (0.8, -0.85), (0.8, 0.1), (0.0, 0.95), (-0.8, 0.1)],
        regular(0, 0, 0.92, 6, 0),
        rect(-0.8, -0.8, 0.8, 0.8),
    ][s["variant"]]
    p.poly([(x * 1.1, y * 1.1) for x, y in outline], _DARK)
    p.region([outline], _colour(s["main"]), s["pattern"], _colour(s["pattern_colour"]))
    p.poly(ellipse(0, 0, 0.42, 0.42), (240, 240, 240))
    p.poly(accent_shape(s["accent_shape"], 0, 0, 0.3), _colour(s["accent_colour"]))


def _animal(p: Painter, s: Spec) -> None:
    main = _colour(s["main"])
    for x in (-0.55, -0.3, 0.15, 0.4):
        p.poly(rect(x, 0.35, x + 0.13, 0.95), _DARK)
    extras = [
        [[(0.42, -0.45), (0.5, -0.8), (0.62, -0.5)], [(0.65, -0.5), (0.78, -0.8), (0.82, -0.45)]],
        [ellipse(0.45, -0.55, 0.12, 0.12, 12), ellipse(0.78, -0.55, 0.12, 0.12, 12)],
        [[(-0.7, 0.0), (-1.05, -0.5), (-0.95, -0.55), (-0.62, -0.1)]],
        [[(0.45, -0.45), (0.3, -0.95), (0.55, -0.5)], [(0.75, -0.45), (0.9, -0.95), (0.82, -0.45)]],
    ][s["variant"]]
    for e in extras:
        p.poly(e, _DARK if s["variant"] == 3 else main)
    p.region([ellipse(-0.1, 0.15, 0.68, 0.4)], main, s["pattern"], _colour(s["pattern_colour"]))
    p.poly(ellipse(0.62, -0.3, 0.28, 0.26), main)
    p.poly(ellipse(0.72, -0.36, 0.05, 0.05, 8), _DARK)
    p.poly(accent_shape(s["accent_shape"], -0.1, 0.15, 0.3), _colour(s["accent_colour"]))


def _landmark(p: Painter, s: Spec) -> None:
    p.poly(rect(-1.4, 0.75, 1.4, 1.4), (90, 110, 80))
    shape = [
        [rect(-0.32, -0.45, 0.32, 0.76), [(-0.45, -0.45), (0.0, -1.0), (0.45, -0.45)]],
        [rect(-0.8, -0.35, 0.8, 0.76)],
        [rect(-0.65, 0.0, 0.65, 0.76), [(x, y) for x, y in ellipse(0, 0.0, 0.65, 0.75) if y <= 0.0]],
        [[(-0.95, 0.76), (0.0, -0.85), (0.95, 0.76)]],
    ][s["variant"]]
    p.region(shape, _colour(s["main"]), s["pattern"], _colour(s["pattern_colour"]))
    if s["variant"] == 1:  # the arch's opening
        p.poly(rect(-0.35, 0.25, 0.35, 0.76), _DARK)
    p.poly(
        accent_shape(s["accent_shape"], 0, -0.05 if s["variant"] != 3 else 0.25, 0.27),
        _colour(s["accent_colour"]),
    )


_FIGURES = {
    "person": _person,
    "film": _film,
    "organisation": _organisation,
    "animal": _animal,
    "landmark": _landmark,
}


def render_entity(kind: str, spec: Spec, view: View, size: int, rng: np.random.Generator) -> Image.Image:
    """One view of a visual KG entity of type ``kind``."""
    bg = jitter(BACKGROUNDS[spec["background"]], rng)
    p = Painter(size, bg, view)  # type: ignore[arg-type]
    _FIGURES[kind](p, spec)
    return p.finish(view, rng)


# ---------------------------------------------------------------- signs


def _sign_outer(kind: int, r: float) -> Points:
    cy = -0.2
    return [
        ellipse(0, cy, r, r),
        regular(0, cy + 0.1 * r, r * 1.15, 3),
        regular(0, cy, r * 1.02, 8, 22.5),
        regular(0, cy, r * 1.12, 4),
        rect(-r * 0.9, cy - r * 0.9, r * 0.9, cy + r * 0.9),
    ][kind]


def _sign_symbol(p: Painter, kind: int, colour: RGB) -> None:
    cy, w = -0.2, 0.1
    if kind == 0:
        p.poly(rect(-0.35, cy - 0.09, 0.35, cy + 0.09), colour)
    elif kind in (1, 2, 3):
        arrow = [
            (0.0, -0.4),
            (0.28, -0.05),
            (0.1, -0.05),
            (0.1, 0.35),
            (-0.1, 0.35),
            (-0.1, -0.05),
            (-0.28, -0.05),
        ]
        turn = {1: (1, 0), 2: (0, -1), 3: (0, 1)}[kind]  # (cos, sin) of the rotation
        p.poly([(x * turn[0] - y * turn[1], cy + x * turn[1] + y * turn[0]) for x, y in arrow], colour)
    elif kind == 4:
        p.poly([(x * 0.7 - y * 0.7, cy + x * 0.7 + y * 0.7) for x, y in cross(0, 0, 0.4)], colour)
    elif kind == 5:
        p.poly(ellipse(0, cy, 0.15, 0.15, 16), colour)
    elif kind == 6:
        p.poly(ellipse(-0.18, cy, 0.11, 0.11, 12), colour)
        p.poly(ellipse(0.18, cy, 0.11, 0.11, 12), colour)
    elif kind == 7:
        zig = [(-0.35, cy + 0.15), (-0.12, cy - 0.15), (0.12, cy + 0.15), (0.35, cy - 0.15)]
        for a, b in itertools.pairwise(zig):
            p.line(a, b, colour, w)
    elif kind == 8:
        p.poly(
            [
                (-0.3, cy + 0.2),
                (0.0, cy - 0.2),
                (0.3, cy + 0.2),
                (0.3, cy + 0.02),
                (0.0, cy - 0.38),
                (-0.3, cy + 0.02),
            ],
            colour,
        )
    else:
        p.poly(ellipse(0, cy, 0.3, 0.3), colour)
        p.poly(ellipse(0, cy, 0.17, 0.17), (0, 0, 0) if colour == (245, 245, 245) else (245, 245, 245))


def render_sign(spec: Spec, view: View, size: int, rng: np.random.Generator) -> Image.Image:
    """One view of a sign: a post, an outer shape with a border, and a symbol."""
    sky = jitter((185, 210, 235), rng)
    p = Painter(size, sky, view)  # type: ignore[arg-type]
    p.poly(rect(-1.5, 0.7, 1.5, 1.5), (120, 150, 95))
    posts = [[(-0.06, 0.06)], [(-0.5, -0.38), (0.38, 0.5)], [(-0.95, -0.83), (0.83, 0.95)]][spec["post"]]
    for x0, x1 in posts:
        p.poly(rect(x0, 0.3 if spec["post"] < 2 else -1.3, x1, 1.3), (110, 110, 110))
    if spec["plate"]:
        p.poly(rect(-0.45, 0.62, 0.45, 0.9), (245, 245, 245) if spec["plate"] == 1 else (30, 30, 30))
    p.poly(_sign_outer(spec["outer"], 0.78), _colour(SIGN_BORDERS[spec["border"]]))
    p.poly(_sign_outer(spec["outer"], 0.6), _colour(SIGN_FILLS[spec["fill"]]))
    _sign_symbol(p, spec["symbol"], _colour(SIGN_SYMBOL_COLOURS[spec["symbol_colour"]]))
    return p.finish(view, rng)


def save_png(img: Image.Image, path: Path) -> None:
    """Write a PNG with no metadata (PIL adds no timestamp), so equal pixels give equal bytes."""
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True)
    img.save(path, format="PNG", optimize=False, compress_level=6)
