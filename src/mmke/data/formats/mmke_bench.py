"""Reader for MMKE-Bench files (``mmke_bench:data_json/entity_eval.json``; also visual_, user_).

Paper: Du et al., "MMKE-Bench: A Multimodal Editing Benchmark for Diverse Visual Knowledge",
ICLR 2025 (github.com/MMKE-Bench-ICLR/MMKE-Bench, a VLKEB fork). Fields
(reference/anchors_spec.md §1.3, §2 "MMKE-Bench extras"): the MMEdit base fields (see
``mmedit``), ``knowledge_type`` (``entity_level`` / ``visual_knowledge`` / ``user_specific``,
or their codes 0 / 2 / 1), ``port_new`` (VLKEB portability), and per type:

* entity_level, user_specific: ``rel_1``/``rel_2`` text-only (T-Rel), ``m_rel_1``/``m_rel_2``
  on the edit image (I-Rel) and on ``image_rephrase`` (Gen_M_Rel, I-Gen); answers under
  ``rel_ans_1`` or ``rel_1_ans`` (both spellings occur); ``one_hop_img`` for user_specific.
* visual_knowledge: ``rel``/``rel_ans`` (T-Rel), ``m_rel``/``m_rel_ans`` (I-Rel),
  ``image_rephrase_question`` on ``image_rephrase`` answered with ``m_rel_ans`` (I-Gen),
  ``one_hop_img``.

Images (``image``, ``m_loc``, ``one_hop_img``) are joined to ``--image-root`` (MMKE-Bench's
``coco_image: data_image``), ``image_rephrase`` to the option ``rephrase_image_root``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmke.data.benchmark import Benchmark
from mmke.data.formats._foreign import (
    Decoded,
    FieldError,
    Fields,
    ImageChecker,
    benchmark_file,
    decode_file,
    make_benchmark,
    take_options,
)
from mmke.data.formats.mmedit import base_probes, edit_fact, image_checker
from mmke.data.formats.vlkeb import port_new_probes
from mmke.registry import register_benchmark
from mmke.types import EditCase, EditFact, EditType, ImageRef, Probe, ProbeKind

OPTIONS = ("rephrase_image_root", "train")

#: MMKE-Bench's knowledge types -> edit types.
EDIT_TYPES = {
    "entity_level": EditType.VISUAL_ENTITY,
    "visual_knowledge": EditType.VISUAL_SEMANTIC,
    "user_specific": EditType.USER_SPECIFIC,
}
#: The integer codes its loader rewrites ``knowledge_type`` to.
CODES = {0: "entity_level", 1: "user_specific", 2: "visual_knowledge"}
#: File name prefixes (``data_json/{entity,visual,user}_eval.json``) -> knowledge type.
PREFIXES = {"entity": "entity_level", "visual": "visual_knowledge", "user": "user_specific"}


def knowledge_type(f: Fields, default: str | None) -> str:
    """The record's knowledge type as MMKE-Bench names it; ``default`` (from the file name) if absent."""
    value = f.rec.get("knowledge_type")
    if value is None:
        if default is None:
            raise FieldError(
                "field 'knowledge_type' missing and the file name does not start with "
                "entity_, visual_ or user_ (name the file so, or add the field)"
            )
        return default
    if isinstance(value, int) and not isinstance(value, bool) and value in CODES:
        return CODES[value]
    if isinstance(value, str) and value in EDIT_TYPES:
        return value
    accepted = ", ".join([*EDIT_TYPES, *(f"{c} ({n})" for c, n in CODES.items())])
    raise FieldError(f"field 'knowledge_type' is {value!r}; accepted: {accepted}")


def type_from_name(path: Path) -> str | None:
    """The knowledge type a file's name (``entity_eval.json``) or folder (``entity/eval.json``) says."""
    for prefix, kind in PREFIXES.items():
        if path.name.startswith(f"{prefix}_") or path.parent.name == prefix:
            return kind
    return None


def numbered_probes(f: Fields, fact: EditFact, rephrase: ImageRef) -> list[Probe]:
    """entity_level / user_specific: T_Rel_i, M_Rel_i and Gen_M_Rel_i for i = 1, 2."""
    probes = []
    for i in (1, 2):
        question = f.text(f"rel_{i}") or ""
        probes.append(
            Probe(ProbeKind.TEXT_RELIABILITY, question, f.text(f"rel_ans_{i}", f"rel_{i}_ans") or "")
        )
        m_question = f.text(f"m_rel_{i}") or ""
        m_answer = f.text(f"m_rel_ans_{i}", f"m_rel_{i}_ans") or ""
        probes.append(Probe(ProbeKind.IMAGE_RELIABILITY, m_question, m_answer, fact.image))
        probes.append(Probe(ProbeKind.IMAGE_GENERALITY, m_question, m_answer, rephrase))
    return probes


def visual_probes(f: Fields, fact: EditFact, rephrase: ImageRef) -> list[Probe]:
    """visual_knowledge: T_Rel, M_Rel, and Gen_M_Rel (``image_rephrase_question``, m_rel's answer)."""
    m_answer = f.text("m_rel_ans") or ""
    return [
        Probe(ProbeKind.TEXT_RELIABILITY, f.text("rel") or "", f.text("rel_ans") or ""),
        Probe(ProbeKind.IMAGE_RELIABILITY, f.text("m_rel") or "", m_answer, fact.image),
        Probe(ProbeKind.IMAGE_GENERALITY, f.text("image_rephrase_question") or "", m_answer, rephrase),
    ]


def mmke_bench_case(f: Fields, case_id: str, images: ImageChecker, default_type: str | None) -> EditCase:
    kind = knowledge_type(f, default_type)
    fact = edit_fact(f, images)
    rephrase = images.ref(f.text("image_rephrase"), "image_rephrase", "rephrase")
    extra = visual_probes if kind == "visual_knowledge" else numbered_probes
    # Portability asks about what the edit implies: on the edit image for entities, on a second
    # picture (``one_hop_img``) for user and visual records, as MMKE-Bench feeds it.
    port_image = fact.image
    if kind != "entity_level" and f.has("one_hop_img"):
        port_image = images.ref(f.rec["one_hop_img"], "one_hop_img")
    # I-Gen is the paper's Gen_M_Rel (the type's questions on ``image_rephrase``); the MMEdit-style
    # ``src`` on ``image_rephrase`` probe is left out so the I-Gen column means what MMKE-Bench's does.
    base = [p for p in base_probes(f, fact, images) if p.kind != ProbeKind.IMAGE_GENERALITY]
    probes = [*base, *extra(f, fact, rephrase), *port_new_probes(f, port_image)]
    unique = tuple(dict.fromkeys(probes))  # e.g. an m_rel equal to src is asked once
    return EditCase(case_id, EDIT_TYPES[kind], fact, unique, meta={"knowledge_type": kind})


def decode(path: Path, images: ImageChecker) -> Decoded:
    """Every record of ``path``; a record without ``knowledge_type`` takes the file name's."""
    default_type = type_from_name(path)

    def to_case(f: Fields, cid: str) -> EditCase:
        return mmke_bench_case(f, cid, images, default_type)

    return decode_file(path, to_case)


@register_benchmark(
    "mmke_bench",
    help="MMKE-Bench JSON (entity_/visual_/user_eval.json): mmke_bench:FILE --image-root data_image "
    "(options: rephrase_image_root, train)",
)
def load_mmke_bench(
    path: str | None, image_root: Path | None = None, skip_bad: bool = False, **options: Any
) -> Benchmark:
    opts = take_options("mmke_bench", options, OPTIONS)
    file = benchmark_file("mmke_bench", path, "data_json/entity_eval.json")
    images = image_checker(image_root, file.parent, opts)
    train = decode(Path(opts["train"]), images) if opts.get("train") else None
    return make_benchmark(
        "mmke_bench", file, decode(file, images), images.root, skip_bad=skip_bad, train=train
    )
