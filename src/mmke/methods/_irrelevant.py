"""Irrelevant inputs from the train split, for the methods that keep an edit away from them (WISE's
routing margin, T-Patcher's memory): the train cases' locality probes, never the edited case's own
(that would train on the test set, EasyEdit#648)."""

from __future__ import annotations

from collections.abc import Sequence

from mmke.methods.base import EditorNotReadyError
from mmke.models.base import LVLM
from mmke.types import LOCALITY_KINDS, EditCase, Sample


def locality_pool(model: LVLM, train_cases: Sequence[EditCase]) -> tuple[Sample, ...]:
    """The train split's distinct locality probes: text ones, and image ones the model can take."""
    seen = dict.fromkeys(
        Sample(p.prompt, p.target, p.image)
        for case in train_cases
        for p in case.probes
        if p.kind in LOCALITY_KINDS and (p.image is None or model.family.multimodal)
    )
    return tuple(seen)


def usable_pool(model: LVLM, pool: tuple[Sample, ...] | None, method: str, use: str) -> tuple[Sample, ...]:
    """``pool`` less the image probes ``model`` cannot open (no image store bound); one clear line
    when ``train`` was not called or nothing is left. ``use`` says what the method needs them for."""
    if pool is None:
        raise EditorNotReadyError(f"{method}: call train(model, train_cases) before apply")
    usable = tuple(s for s in pool if s.image is None or model.images is not None)
    if not usable:
        raise EditorNotReadyError(
            f"{method}: the train split gave no usable locality probes (text or image locality, "
            f"image ones need an image store bound to the model); {use}"
        )
    return usable
