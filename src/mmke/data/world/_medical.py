"""The MedMKEB-style medical slice: scan-like images (modality x body part x finding) and a small medical KG.

Findings carry visual attributes (shape, intensity, size, margin); "most similar finding" is the
count of shared attributes, so counterfactual targets are chosen without any learned model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from mmke.data.world._render import Painter, Points, View, ellipse, rect, regular

MODALITIES = ("ct", "mri", "xray", "ultrasound")
MODALITY_WORDS = {"ct": "ct scan", "mri": "mri scan", "xray": "xray", "ultrasound": "ultrasound"}
BODY_PARTS = ("chest", "head", "abdomen", "knee", "spine")


@dataclass(frozen=True)
class Finding:
    """A finding, how it looks on a scan, and how it is treated (first hop of the medical KG)."""

    name: str
    shape: str
    intensity: str
    size: str
    margin: str
    treatment: str

    def attrs(self) -> tuple[str, str, str, str]:
        return (self.shape, self.intensity, self.size, self.margin)


# Ordered so that the first few (a small world) still differ in shape.
FINDINGS = (
    Finding("mass", "blob", "bright", "large", "smooth", "surgery"),
    Finding("fracture", "line", "dark", "small", "sharp", "cast"),
    Finding("cyst", "blob", "dark", "medium", "smooth", "aspiration"),
    Finding("nodules", "dots", "bright", "small", "smooth", "observation"),
    Finding("effusion", "haze", "bright", "large", "smooth", "tapping"),
    Finding("abscess", "ring", "bright", "medium", "irregular", "drainage"),
    Finding("tumor", "blob", "bright", "medium", "irregular", "chemotherapy"),
    Finding("stone", "blob", "white", "small", "sharp", "lithotripsy"),
    Finding("edema", "haze", "grey", "large", "irregular", "diuretics"),
    Finding("calcification", "dots", "white", "small", "sharp", "monitoring"),
    Finding("infarct", "wedge", "dark", "medium", "sharp", "thrombolysis"),
    Finding("hemorrhage", "blob", "white", "large", "irregular", "transfusion"),
)
TREATMENT_SPECIALIST = {
    "surgery": "surgeon",
    "cast": "orthopedist",
    "aspiration": "radiologist",
    "observation": "pulmonologist",
    "tapping": "pulmonologist",
    "drainage": "surgeon",
    "chemotherapy": "oncologist",
    "lithotripsy": "urologist",
    "diuretics": "cardiologist",
    "monitoring": "radiologist",
    "thrombolysis": "neurologist",
    "transfusion": "hematologist",
}
SPECIALIST_DEPARTMENT = {
    "surgeon": "theatre",
    "orthopedist": "orthopedics",
    "radiologist": "imaging",
    "pulmonologist": "medicine",
    "oncologist": "oncology",
    "urologist": "urology",
    "cardiologist": "medicine",
    "neurologist": "neurology",
    "hematologist": "medicine",
}
N_OPTIONS = 4


@dataclass(frozen=True)
class Combo:
    """One kind of scan item: a modality, a body part and the finding it shows."""

    modality: str
    part: str
    finding: Finding

    @property
    def id(self) -> str:
        return f"{self.modality}-{self.part}-{self.finding.name}"

    @property
    def phrase(self) -> str:
        """How a question names the scan: "this ct scan of the chest"."""
        return f"this {MODALITY_WORDS[self.modality]} of the {self.part}"


def make_combos(modalities: int, parts: int, findings: int) -> tuple[Combo, ...]:
    return tuple(
        Combo(m, p, f)
        for m in MODALITIES[:modalities]
        for p in BODY_PARTS[:parts]
        for f in FINDINGS[:findings]
    )


def similarity(a: Finding, b: Finding) -> int:
    """How many visual attributes two findings share (0-4)."""
    return sum(x == y for x, y in zip(a.attrs(), b.attrs(), strict=True))


def most_similar(f: Finding, candidates: list[Finding]) -> Finding:
    """The candidate sharing most attributes with ``f``; ties go to the earlier one in FINDINGS."""
    return max((c for c in candidates if c != f), key=lambda c: (similarity(f, c), -FINDINGS.index(c)))


def mcq_options(
    f: Finding, pool: tuple[Finding, ...], rng: np.random.Generator
) -> tuple[tuple[str, ...], str]:
    """Options (shuffled, incl. the answer) and the counterfactual: the option most similar to ``f``.

    The globally most similar finding is always a distractor, so the counterfactual is a hard one.
    """
    others = [c for c in pool if c != f]
    near = most_similar(f, others)
    rest = [c for c in others if c != near]
    picks = [rest[int(i)] for i in rng.choice(len(rest), size=N_OPTIONS - 2, replace=False)]
    cf = most_similar(f, [near, *picks])
    opts = [f, near, *picks]
    return tuple(opts[int(i)].name for i in rng.permutation(len(opts))), cf.name


# ---------------------------------------------------------------- scans

_LEVEL = {"white": 250, "bright": 205, "grey": 160, "dark": 25}
_RADIUS = {"small": 0.11, "medium": 0.18, "large": 0.27}
# modality -> (background, tissue, bone, air) grey levels
_STYLE = {
    "ct": (5, 105, 235, 15),
    "mri": (0, 135, 50, 10),
    "xray": (20, 70, 215, 35),
    "ultrasound": (0, 95, 150, 30),
}


def _g(v: int) -> tuple[int, int, int]:
    v = int(np.clip(v, 0, 255))
    return (v, v, v)


def _anatomy(p: Painter, part: str, tissue: int, bone: int, air: int) -> tuple[float, float]:
    """Draw the body part; returns where the finding goes (inside the organ of interest)."""
    if part == "chest":
        p.poly(ellipse(0, 0, 0.95, 0.7), _g(tissue))
        p.poly(ellipse(-0.42, -0.05, 0.32, 0.48), _g(air))
        p.poly(ellipse(0.42, -0.05, 0.32, 0.48), _g(air))
        p.poly(ellipse(0, 0.5, 0.12, 0.1, 12), _g(bone))
        return (-0.42, -0.05)
    if part == "head":
        p.poly(ellipse(0, 0, 0.8, 0.9), _g(bone))
        p.poly(ellipse(0, 0, 0.7, 0.8), _g(tissue))
        p.poly(rect(-0.03, -0.75, 0.03, 0.75), _g(tissue - 25))
        return (0.3, -0.1)
    if part == "abdomen":
        p.poly(ellipse(0, 0, 0.95, 0.75), _g(tissue))
        p.poly(ellipse(-0.35, -0.15, 0.4, 0.3), _g(tissue + 25))
        p.poly(ellipse(0, 0.5, 0.13, 0.11, 12), _g(bone))
        return (-0.35, -0.15)
    if part == "knee":
        p.poly(rect(-0.55, -1.2, 0.55, 1.2), _g(tissue))
        p.poly(rect(-0.32, -1.2, 0.32, -0.08), _g(bone))
        p.poly(rect(-0.3, 0.08, 0.3, 1.2), _g(bone))
        return (0.0, -0.4)
    p.poly(rect(-0.5, -1.2, 0.5, 1.2), _g(tissue))
    for k in range(5):
        y = -0.95 + k * 0.42
        p.poly(rect(-0.22, y, 0.22, y + 0.3), _g(bone))
    return (0.0, 0.1)


def _blob(cx: float, cy: float, r: float, margin: str, rng: np.random.Generator) -> Points:
    if margin == "sharp":
        return regular(cx, cy, r * 1.1, 6, float(rng.uniform(0, 60)))
    if margin == "irregular":
        n = 14
        rs = r * rng.uniform(0.6, 1.35, size=n)
        return [
            (cx + rs[i] * np.cos(2 * np.pi * i / n), cy + rs[i] * np.sin(2 * np.pi * i / n)) for i in range(n)
        ]
    return ellipse(cx, cy, r, r * 0.9)


def _finding(p: Painter, f: Finding, at: tuple[float, float], tissue: int, rng: np.random.Generator) -> None:
    cx, cy = at[0] + float(rng.uniform(-0.08, 0.08)), at[1] + float(rng.uniform(-0.08, 0.08))
    r, level = _RADIUS[f.size], _LEVEL[f.intensity]
    if f.shape == "blob":
        p.poly(_blob(cx, cy, r, f.margin, rng), _g(level))
    elif f.shape == "ring":
        p.poly(_blob(cx, cy, r * 1.2, f.margin, rng), _g(level))
        p.poly(ellipse(cx, cy, r * 0.6, r * 0.6), _g(tissue // 2))
    elif f.shape == "dots":
        for _ in range(5):
            p.poly(
                ellipse(
                    cx + float(rng.uniform(-0.25, 0.25)), cy + float(rng.uniform(-0.25, 0.25)), 0.06, 0.06, 8
                ),
                _g(level),
            )
    elif f.shape == "line":
        p.line((cx - 0.35, cy - 0.12), (cx + 0.35, cy + 0.12), _g(level), 0.06)
    elif f.shape == "haze":
        p.poly(_blob(cx, cy + 0.15, r * 1.5, f.margin, rng), _g((level + tissue) // 2))
    else:  # wedge
        p.poly([(cx - 0.05, cy - 0.3), (cx + 0.35, cy + 0.25), (cx - 0.3, cy + 0.25)], _g(level))


def render_scan(combo: Combo, view: View, size: int, rng: np.random.Generator) -> Image.Image:
    """A scan-like greyscale picture (stored as RGB) of ``combo``: modality style, anatomy, finding."""
    bg, tissue, bone, air = _STYLE[combo.modality]
    p = Painter(size, _g(bg), view)
    if combo.modality == "ultrasound":  # the fan-shaped field of view
        fan = [(0.0, -1.0)] + [(1.9 * np.sin(t), -1.0 + 1.9 * np.cos(t)) for t in np.linspace(-0.6, 0.6, 12)]
        p.poly(fan, _g(tissue - 30))
    at = _anatomy(p, combo.part, tissue, bone, air)
    _finding(p, combo.finding, at, tissue, rng)
    grey = View(view.angle, view.scale, view.dx, view.dy, (view.tint[0],) * 3, view.noise)  # type: ignore[arg-type]
    if combo.modality == "ultrasound":  # speckle is what ultrasound looks like
        grey = View(view.angle, view.scale, view.dx, view.dy, grey.tint, 0.2)
    return p.finish(grey, rng)
