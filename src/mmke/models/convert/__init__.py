"""``mmke convert-model``: the seed papers' original checkpoints -> transformers folders mmke drives.

Each kind registers with ``@register_checkpoint_kind`` and reads its release's SRC layout into a
``Conversion``: the original files, each with a table of key templates -> target keys (or a
reason to drop them), and the target's transformers config and processor, whose chat template
carries the original prompt format. One mechanism (``_mapping.plan``) applies the tables and
checks them against the target model built from its config before anything is written.
Kinds: ``minigpt4`` (Blip2ForConditionalGeneration), ``llava_med`` and ``huatuogpt_vision``
(LlavaForConditionalGeneration).
"""

from __future__ import annotations

from pathlib import Path

from mmke.models.convert._mapping import ConversionError, Drop, Rule
from mmke.models.convert._write import Conversion, ConversionReport, Target, convert
from mmke.registry import checkpoint_kinds

__all__ = ["Conversion", "ConversionError", "ConversionReport", "Drop", "Rule", "Target", "convert_model"]


def convert_model(kind: str, src: str | Path, out: str | Path) -> ConversionReport:
    """Convert the original release in folder ``src`` of checkpoint ``kind`` into the new folder ``out``."""
    src = Path(src)
    prepare = checkpoint_kinds.get(kind)  # an unknown kind: one line with close matches
    if not src.is_dir():
        raise ConversionError(f"{src}: no such folder (SRC is the folder holding the original {kind} files)")
    return convert(prepare(src), src, Path(out))
