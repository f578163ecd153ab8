"""Reader for VLKEB's files: ``train.json``, ``eval.json``, ``eval_multihop.json``, ``eval_edit_onehop.json``.

Records carry MMEdit's base fields (``mmedit.base_probes``) plus ``port_new`` (anchors_spec §1.2):
- multi-hop: ``{"port_type": "1-hop".."4-hop", "Q&A": {"Question", "Answer"}}`` -> a portability
  probe of that hop, asked on the edit image;
- edit-one-hop: ``{"port_q", "port_a", "port_edit_q", "port_edit_a"}`` -> a 2-hop portability
  probe whose ``onehop_edit`` is the second fact (``protocol=edit_onehop`` writes it first).
  It is text-only as in VLKEB; option ``edit_twice_img=true`` gives it the edit image.
Option ``hop=N`` reproduces VLKEB's loader: only records with an N-hop entry are kept, with
just their first N-hop entry (so Rel/Gen/Loc are measured on that subset too, as in the paper).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from mmke.data.benchmark import Benchmark
from mmke.data.formats._foreign import (
    FieldError,
    Fields,
    ImageChecker,
    LeftOut,
    benchmark_file,
    checked_text,
    decode_file,
    make_benchmark,
    take_options,
)
from mmke.data.formats.mmedit import OPTIONS as MMEDIT_OPTIONS
from mmke.data.formats.mmedit import base_probes, edit_fact, image_checker
from mmke.errors import ConfigError
from mmke.registry import register_benchmark
from mmke.types import EditCase, EditFact, EditType, ImageRef, Probe, ProbeKind

OPTIONS = (*MMEDIT_OPTIONS, "hop", "edit_twice_img")
ONEHOP_KEYS = ("port_q", "port_a", "port_edit_q", "port_edit_a")
#: Hop given to edit-one-hop questions: they chain the edit and the one-hop fact.
ONEHOP_HOP = 2


def port_hop(value: Any, where: str) -> int:
    """The hop of a ``port_type`` "1-hop".."4-hop" (a FieldError naming ``where`` otherwise)."""
    text = value if isinstance(value, str) else ""
    head = text.split("-")[0]
    if not head.isdigit() or not 1 <= int(head) <= 4 or not text.endswith("-hop"):
        raise FieldError(f"{where}: port_type must be '1-hop'..'4-hop', got {value!r}")
    return int(head)


def port_new_probes(
    f: Fields,
    image: ImageRef | None,
    hop: int | None = None,
    edit_image: bool = False,
    skip: Collection[str] = (),
) -> list[Probe]:
    """Portability probes of ``port_new`` asked on ``image`` (only the first ``hop``-hop one if given);
    entries whose ``port_type`` is in ``skip`` are another reader's (CCKEB's "comp")."""
    probes: list[Probe] = []
    for i, item in enumerate(f.items("port_new")):
        where = f"port_new[{i}]"
        if not isinstance(item, dict):
            raise FieldError(f"{where} must be an object")
        if item.get("port_type") in skip:
            continue
        if "port_type" in item or "Q&A" in item:
            n = port_hop(item.get("port_type"), where)
            qa = item.get("Q&A")
            if not isinstance(qa, dict):
                raise FieldError(f"{where}: 'Q&A' must be an object with 'Question' and 'Answer'")
            if hop is not None and n != hop:
                continue
            q = checked_text(qa.get("Question"), f"{where}.Q&A.Question")
            a = checked_text(qa.get("Answer"), f"{where}.Q&A.Answer")
            probes.append(Probe(ProbeKind.PORTABILITY, q, a, image, hop=n))
            if hop is not None:
                break
        elif any(k in item for k in ONEHOP_KEYS):
            q, a, eq, ea = (checked_text(item.get(k), f"{where}.{k}") for k in ONEHOP_KEYS)
            second = EditFact(eq, ea, image if edit_image else None)
            probes.append(Probe(ProbeKind.PORTABILITY, q, a, image, hop=ONEHOP_HOP, onehop_edit=second))
        else:
            raise FieldError(f"{where}: expected 'port_type' + 'Q&A' or {', '.join(ONEHOP_KEYS)}")
    if hop is not None and not probes:
        raise LeftOut  # VLKEB's hop filter drops the record; it is not a bad one
    return probes


def _hop_option(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 4:
        return value
    raise ConfigError(f"benchmark option hop={value!r}: expected 1, 2, 3 or 4")


def _case_maker(images: ImageChecker, hop: int | None, twice: bool) -> Callable[[Fields, str], EditCase]:
    def to_case(f: Fields, cid: str) -> EditCase:
        fact = edit_fact(f, images)
        port = port_new_probes(f, fact.image, hop, twice)
        return EditCase(cid, EditType.VISUAL_ENTITY, fact, (*base_probes(f, fact, images), *port))

    return to_case


@register_benchmark(
    "vlkeb",
    help="VLKEB JSON (eval, eval_multihop, eval_edit_onehop): vlkeb:FILE --image-root VLKEB_images "
    "(options: hop, edit_twice_img, rephrase_image_root, train)",
)
def load_vlkeb(
    path: str | None, image_root: Path | None = None, skip_bad: bool = False, **options: Any
) -> Benchmark:
    opts = take_options("vlkeb", options, OPTIONS)
    file = benchmark_file("vlkeb", path, "path/to/eval_multihop.json")
    twice = bool(opts.get("edit_twice_img", False))
    images = image_checker(image_root, file.parent, opts)
    decoded = decode_file(file, _case_maker(images, _hop_option(opts.get("hop")), twice))
    train = decode_file(Path(opts["train"]), _case_maker(images, None, twice)) if opts.get("train") else None
    return make_benchmark("vlkeb", file, decoded, images.root, skip_bad=skip_bad, train=train)
