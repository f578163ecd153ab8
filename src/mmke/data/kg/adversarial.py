"""Adversarial robustness prompts of MedMKEB's five types, wrapped around an edit question.

MedMKEB (Xu et al., AAAI 2026) attacks an edited fact with pseudo-authoritative interference,
feature (symptom) confusion, misleading context, irrelevant details and vague wording; the
right answer stays the edit target. Templates here are plain lowercase words with punctuation
as separate tokens, so they also read well for the world model's word-level tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmke.types import AttackType

IRRELEVANT = (
    "the weather was warm and the room smelled of tea .",
    "it was a long day and everyone was tired .",
    "the picture was taken on a tuesday morning .",
    "there were three cups on the table .",
)


@dataclass(frozen=True)
class AttackParts:
    """What the attacks need besides the question: a wrong answer, a look-alike, context, vague wording.

    ``old`` is the pre-edit (or a decoy) answer, ``similar`` a look-alike, ``context`` a
    misleading sentence and ``vague`` a vaguer rewording of the question.
    """

    old: str
    similar: str
    context: str
    vague: str


def attack(kind: AttackType, question: str, parts: AttackParts, detail: int) -> str:
    """``question`` under attack ``kind``; ``detail`` picks the irrelevant sentence."""
    if kind == AttackType.PSEUDO_AUTHORITY:
        return f"a famous expert insists the answer is {parts.old} . {question}"
    if kind == AttackType.FEATURE_CONFUSION:
        return f"note that it looks very much like {parts.similar} . {question}"
    if kind == AttackType.MISLEADING_CONTEXT:
        return f"{parts.context} {question}"
    if kind == AttackType.IRRELEVANT_DETAILS:
        return f"{IRRELEVANT[detail % len(IRRELEVANT)]} {question}"
    return parts.vague


def attacks(question: str, parts: AttackParts, detail: int) -> list[tuple[AttackType, str]]:
    """All five attacked prompts, in ``AttackType`` order."""
    return [(kind, attack(kind, question, parts, detail)) for kind in AttackType]
