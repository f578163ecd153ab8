"""No-op: an edit that changes nothing (no paper; a control for the engine).

Under it locality must read 1.0 and reliability the unedited score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mmke.methods.base import Editor, ParamEdited
from mmke.models.base import LVLM
from mmke.registry import register_method
from mmke.types import EditCase


@dataclass(frozen=True)
class NoOpConfig:
    """No settings."""


@register_method("noop")
class NoOp(Editor[NoOpConfig]):
    """No-op: leaves the model untouched (a control for the engine's metrics)."""

    name = "noop"
    defaults = NoOpConfig()
    batches = True

    def apply_many(self, model: LVLM, cases: Sequence[EditCase]) -> ParamEdited:
        return ParamEdited(model, {})

    def apply(self, model: LVLM, case: EditCase) -> ParamEdited:
        return ParamEdited(model, {})
