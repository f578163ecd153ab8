"""Reader for CCKEB (``cckeb:CCKEB_eval.json``, ``CCKEB_train.json``): a visual edit, a textual one, and both.

CCKEB (Compositional Chain Knowledge Editing Benchmark) comes with MemEIC (Seong et al., "MemEIC:
A Step Toward Continual and Compositional Knowledge Editing", NeurIPS 2025, arXiv 2510.25798;
github.com/MemEIC/MemEIC). Each record is a VLKEB record (images under VLKEB's ``mmkb_images``)
plus a textual edit about the pictured entity and a question that needs both edits.

Field mapping (names verified in MemEIC's ``CompositionalDataset`` / ``CompositionalCaptionDataset``):
- main (visual) edit and its probes exactly as VLKEB: ``src`` + ``image`` -> ``alt`` (``pred`` the
  pre-edit answer), ``rephrase``, ``image_rephrase``, ``loc``/``loc_ans``, ``m_loc``/``m_loc_q``/
  ``m_loc_a`` (``mmedit.edit_fact`` / ``base_probes``); edit type ``visual_entity``.
- ``textual_edit`` {``src``, ``pred``, ``alt``, ``rephrase``, ``loc``, ``loc_ans``} (required): the
  case's companion fact ``src`` -> ``alt`` with no image, written right after the visual edit in
  every protocol; ``pred``/``alt`` may be lists of strings, joined with one space as the loaders do.
  Probes: Txt-Rel (``src``), Txt-Gen (``rephrase``), Txt-Loc (``loc`` -> ``loc_ans``), all text-only.
- ``port_new`` entry with ``port_type: "comp"``: CompRel, ``Q&A.Question`` asked on the edit image
  with target ``textual_edit.alt`` (the loaders' ``port_a = textual_alt``), not ``Q&A.Answer``,
  which is kept as an alias when it differs. Only the first ``comp`` entry counts (the loaders
  ``break`` after it). ``"1-hop"``..``"4-hop"`` entries are VLKEB portability probes.
- Ignored: MemEIC's query-decomposition fields of its ``prompt/`` copy (``src_q``, ``rephrase_q``,
  ``m_loc_q_q``, ``Q&A.Query``: inputs of its method, not the benchmark) and a ``port_new`` inside
  ``textual_edit`` (``CompositionalCaptionDataset`` only tests that it exists).

Inferred, not verified (no CCKEB data card was found): that ``Q&A.Answer`` is optional (only
``CompositionalCaptionDataset`` reads it) and that ``N-hop`` entries may sit beside ``comp``
(MemEIC's ``hop=2..4`` selects them). A record without a ``comp`` entry is a bad record here:
MemEIC drops it silently at its default ``hop=1``; ``skip_bad=true`` does the same but lists it.
Records with an empty ``alt`` (also dropped by MemEIC) are bad records for the same reason.
MemEIC's protocol, visual then textual edit of record s, then score record s - gap, for gaps
0, 10, 20, 50, 100 on the first 500 records, is ``protocol=sequential gaps=[0,10,20,50,100]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmke.data.benchmark import Benchmark
from mmke.data.checks import json_type
from mmke.data.formats._foreign import (
    FieldError,
    Fields,
    ImageChecker,
    benchmark_file,
    checked_text,
    decode_file,
    make_benchmark,
    take_options,
)
from mmke.data.formats.mmedit import OPTIONS, base_probes, edit_fact, image_checker
from mmke.data.formats.vlkeb import port_new_probes
from mmke.registry import register_benchmark
from mmke.types import EditCase, EditFact, EditType, ImageRef, Probe, ProbeKind

#: MemEIC's ``port_types[1]``: the entry its default ``hop=1`` scores.
COMP = "comp"
TEXTUAL = "textual_edit"


# ---------------------------------------------------------------- the textual edit


def _textual_object(f: Fields) -> dict[str, Any]:
    value = f.rec.get(TEXTUAL)
    if value is None:
        raise FieldError(f"field {TEXTUAL!r} missing")
    if not isinstance(value, dict):
        raise FieldError(f"field {TEXTUAL!r} must be an object, got {json_type(value)}")
    return value


def _answer(value: Any, key: str) -> str:
    """A string, or a list of strings joined with one space (MemEIC's ``" ".join(...)``)."""
    if not isinstance(value, list):
        return checked_text(value, key)
    if not value:
        raise FieldError(f"field {key!r} is an empty list")
    return checked_text(" ".join(checked_text(v, f"{key}[{i}]") for i, v in enumerate(value)), key)


def _text(te: dict[str, Any], key: str) -> str | None:
    value = te.get(key)
    return None if value is None else checked_text(value, f"{TEXTUAL}.{key}")


def _required(te: dict[str, Any], key: str) -> Any:
    if te.get(key) is None:
        raise FieldError(f"field '{TEXTUAL}.{key}' missing")
    return te[key]


def textual_fact(te: dict[str, Any]) -> EditFact:
    """``textual_edit.src`` -> ``alt`` with no image (``pred``, when given, is the pre-edit answer)."""
    pred = te.get("pred")
    return EditFact(
        prompt=checked_text(_required(te, "src"), f"{TEXTUAL}.src"),
        target=_answer(_required(te, "alt"), f"{TEXTUAL}.alt"),
        image=None,
        ground_truth=None if pred is None else _answer(pred, f"{TEXTUAL}.pred"),
    )


def textual_probes(te: dict[str, Any], fact: EditFact) -> list[Probe]:
    """Txt-Rel, Txt-Gen (``rephrase``, if present) and Txt-Loc (``loc``/``loc_ans``, if present)."""
    probes = [Probe(ProbeKind.TEXTUAL_EDIT_RELIABILITY, fact.prompt, fact.target)]
    rephrase = _text(te, "rephrase")
    if rephrase is not None:
        probes.append(Probe(ProbeKind.TEXTUAL_EDIT_GENERALITY, rephrase, fact.target))
    if te.get("loc") is not None or te.get("loc_ans") is not None:
        loc, ans = (checked_text(_required(te, k), f"{TEXTUAL}.{k}") for k in ("loc", "loc_ans"))
        probes.append(Probe(ProbeKind.TEXTUAL_EDIT_LOCALITY, loc, ans))
    return probes


# ---------------------------------------------------------------- port_new


def _is_comp(item: Any) -> bool:
    return isinstance(item, dict) and item.get("port_type") == COMP


def compositional_probe(f: Fields, image: ImageRef | None, target: str) -> Probe:
    """The first ``comp`` entry's question on the edit image, answered with the textual edit's ``alt``."""
    found = [(i, item) for i, item in enumerate(f.items("port_new")) if _is_comp(item)]
    if not found:
        raise FieldError(
            "port_new has no 'comp' entry (the compositional question; MemEIC drops such records)"
        )
    i, item = found[0]
    qa = item.get("Q&A")
    if not isinstance(qa, dict):
        raise FieldError(f"port_new[{i}]: 'Q&A' must be an object with 'Question'")
    if qa.get("Question") is None:
        raise FieldError(f"field 'port_new[{i}].Q&A.Question' missing")
    question = checked_text(qa["Question"], f"port_new[{i}].Q&A.Question")
    stated = qa.get("Answer")
    alias = None if stated is None else checked_text(stated, f"port_new[{i}].Q&A.Answer")
    aliases = (alias,) if alias is not None and alias != target else ()
    return Probe(ProbeKind.COMPOSITIONAL, question, target, image, aliases=aliases)


def hop_probes(f: Fields, image: ImageRef | None) -> list[Probe]:
    """VLKEB's portability probes of the entries other than ``comp``."""
    return port_new_probes(f, image, skip=(COMP,))


# ---------------------------------------------------------------- records -> cases


def cckeb_case(f: Fields, case_id: str, images: ImageChecker) -> EditCase:
    """One record: the visual edit with the textual edit as its companion, and every probe of both."""
    fact = edit_fact(f, images)
    te = _textual_object(f)
    text_fact = textual_fact(te)
    probes = (
        *base_probes(f, fact, images),
        *textual_probes(te, text_fact),
        compositional_probe(f, fact.image, text_fact.target),
        *hop_probes(f, fact.image),
    )
    return EditCase(case_id, EditType.VISUAL_ENTITY, fact, probes, companions=(text_fact,))


@register_benchmark(
    "cckeb",
    help="CCKEB JSON (MemEIC): cckeb:CCKEB_eval.json --image-root CCKEB_images/mmkb_images "
    "(options: rephrase_image_root, train)",
)
def load_cckeb(
    path: str | None, image_root: Path | None = None, skip_bad: bool = False, **options: Any
) -> Benchmark:
    opts = take_options("cckeb", options, OPTIONS)
    file = benchmark_file("cckeb", path, "path/to/CCKEB_eval.json")
    images = image_checker(image_root, file.parent, opts)

    def to_case(f: Fields, cid: str) -> EditCase:
        return cckeb_case(f, cid, images)

    train = decode_file(Path(opts["train"]), to_case) if opts.get("train") else None
    return make_benchmark(
        "cckeb", file, decode_file(file, to_case), images.root, skip_bad=skip_bad, train=train
    )
