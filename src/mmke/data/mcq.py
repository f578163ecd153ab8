"""How a multiple-choice question is put to a model: one rendering for the world and for medmcq files."""

from __future__ import annotations

from collections.abc import Sequence


def render_options(question: str, options: Sequence[str]) -> str:
    """The multiple-choice prompt: question, then the options separated by spaced commas."""
    return f"{question} options : {' , '.join(options)} ."
