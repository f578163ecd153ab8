"""The data every part of mmke speaks: images, probes, edits and cases (frozen, typed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class ProbeKind(StrEnum):
    """What a probe measures; names follow VLKEB / MMKE-Bench / MedMKEB."""

    RELIABILITY = "reliability"
    TEXT_RELIABILITY = "text_reliability"
    IMAGE_RELIABILITY = "image_reliability"
    TEXT_GENERALITY = "text_generality"
    IMAGE_GENERALITY = "image_generality"
    TEXT_LOCALITY = "text_locality"
    IMAGE_LOCALITY = "image_locality"
    PORTABILITY = "portability"
    ROBUSTNESS = "robustness"
    #: ComprehendEdit: an in-domain neighbour sample (another edit's question and image) answered
    #: with its own answer after the edit (KGI), or an originally right sample that must keep the
    #: unedited model's answer (KPI); ``group`` names the neighbour list.
    IN_DOMAIN_GENERALITY = "in_domain_generality"
    IN_DOMAIN_LOCALITY = "in_domain_locality"
    #: CCKEB: the case's companion (textual) edit asked directly, rephrased, and an unrelated
    #: text fact beside it; and a question that needs the main and the companion edit together.
    TEXTUAL_EDIT_RELIABILITY = "textual_edit_reliability"
    TEXTUAL_EDIT_GENERALITY = "textual_edit_generality"
    TEXTUAL_EDIT_LOCALITY = "textual_edit_locality"
    COMPOSITIONAL = "compositional"
    #: MMQAKE: an intermediate sub-question of a multi-hop chain (``group`` = the chain,
    #: ``variant`` = the paraphrase of the chain's final question it goes with).
    HOP_STEP = "hop_step"


#: Kinds whose score is agreement with the unedited model rather than the target.
LOCALITY_KINDS = frozenset(
    {
        ProbeKind.TEXT_LOCALITY,
        ProbeKind.IMAGE_LOCALITY,
        ProbeKind.IN_DOMAIN_LOCALITY,
        ProbeKind.TEXTUAL_EDIT_LOCALITY,
    }
)


class EditType(StrEnum):
    """MMKE-Bench's three edit types plus MedMKEB's multiple-choice medical edits."""

    VISUAL_ENTITY = "visual_entity"
    VISUAL_SEMANTIC = "visual_semantic"
    USER_SPECIFIC = "user_specific"
    MEDICAL_MCQ = "medical_mcq"


class AttackType(StrEnum):
    """MedMKEB's five adversarial prompt types (robustness probes)."""

    PSEUDO_AUTHORITY = "pseudo_authority"
    FEATURE_CONFUSION = "feature_confusion"
    MISLEADING_CONTEXT = "misleading_context"
    IRRELEVANT_DETAILS = "irrelevant_details"
    VAGUE_WORDING = "vague_wording"


@dataclass(frozen=True)
class ImageRef:
    """An image as a relative POSIX path under a data root; never absolute, never escaping it."""

    path: str


@dataclass(frozen=True)
class Sample:
    """A prompt (optionally with an image) and the answer expected after it."""

    prompt: str
    target: str
    image: ImageRef | None = None


@dataclass(frozen=True)
class EditFact:
    """The fact an edit writes: prompt (+ image) -> target; ground_truth is the pre-edit answer.

    ``ground_truth`` is None for insertions of new knowledge (user-specific edits).
    ``options`` holds the choices of a multiple-choice item (already rendered into ``prompt``).
    """

    prompt: str
    target: str
    image: ImageRef | None = None
    ground_truth: str | None = None
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Probe:
    """One question asked after an edit, and what it measures.

    For locality kinds ``target`` is the unedited answer (the score compares against the
    pre-edit model, the target only anchors the answer span). ``hop`` is set for
    portability (1-4), ``attack`` for robustness. ``onehop_edit`` is a second fact that the
    edit-one-hop protocol writes before asking this probe.
    """

    kind: ProbeKind
    prompt: str
    target: str
    image: ImageRef | None = None
    hop: int | None = None
    attack: AttackType | None = None
    options: tuple[str, ...] = ()
    onehop_edit: EditFact | None = None
    #: Other names of the target a generated answer may give (free generation, the judge).
    aliases: tuple[str, ...] = ()
    #: Probes that score together: a neighbour list (ComprehendEdit's ``img_topk``…) or one
    #: multi-hop chain (MMQAKE); ``variant`` is the paraphrase a chain's probe belongs to.
    group: str | None = None
    variant: int | None = None


@dataclass(frozen=True)
class EditCase:
    """One edit and every probe that measures it.

    ``companions`` are further facts written right after ``edit`` whenever the case is edited
    (CCKEB's textual edit beside its visual one), so its probes see all of them. ``task`` is the
    benchmark's task type (MultiMedEdit's understanding / reasoning, ComprehendEdit's category,
    MMKU-Bench's scenario); summaries and reports split by it.
    """

    case_id: str
    edit_type: EditType
    edit: EditFact
    probes: tuple[Probe, ...]
    subject: str | None = None
    meta: dict[str, str] = field(default_factory=dict, hash=False, compare=True)
    companions: tuple[EditFact, ...] = ()
    task: str | None = None

    def probes_of(self, kind: ProbeKind) -> tuple[Probe, ...]:
        return tuple(p for p in self.probes if p.kind == kind)
