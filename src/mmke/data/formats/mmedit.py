"""Reader for MMEdit's E-VQA and E-IC files (``mmedit:vqa_eval.json``, ``mmedit:caption_eval_edit.json``).

Fields (reference/anchors_spec.md §1.1): ``src`` edit prompt (a question, or a caption prefix
for E-IC), ``alt`` new target, ``pred`` the pre-edit answer, ``rephrase`` (T-Gen),
``image`` / ``image_rephrase`` (I-Gen), ``loc``/``loc_ans`` (T-Loc, kept with its
"nq question:" prefix as the papers feed it), ``m_loc``/``m_loc_q``/``m_loc_a`` (I-Loc).
VLKEB and MMKE-Bench records carry the same base fields, so their readers build on
``base_probes``. EasyEdit joins ``image`` and ``m_loc`` to ``coco_image`` and
``image_rephrase`` to ``rephrase_image``; here those are ``--image-root`` and the option
``rephrase_image_root`` (default: the same folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmke.data.benchmark import Benchmark
from mmke.data.formats._foreign import (
    Fields,
    ImageChecker,
    benchmark_file,
    decode_file,
    make_benchmark,
    take_options,
)
from mmke.registry import register_benchmark
from mmke.types import EditCase, EditFact, EditType, Probe, ProbeKind

OPTIONS = ("rephrase_image_root", "train")


def edit_fact(f: Fields, images: ImageChecker) -> EditFact:
    """``src`` + ``image`` -> ``alt`` (``pred``, when given, is the pre-edit answer)."""
    return EditFact(
        prompt=f.text("src") or "",
        target=f.text("alt") or "",
        image=images.ref(f.rec.get("image"), "image"),
        ground_truth=f.text("pred", required=False),
    )


def base_probes(f: Fields, fact: EditFact, images: ImageChecker) -> list[Probe]:
    """Rel, T-Gen, I-Gen, T-Loc and I-Loc from the MMEdit base fields (absent optional ones skipped)."""
    probes = [Probe(ProbeKind.RELIABILITY, fact.prompt, fact.target, fact.image)]
    rephrase = f.text("rephrase", required=False)
    if rephrase is not None:
        probes.append(Probe(ProbeKind.TEXT_GENERALITY, rephrase, fact.target, fact.image))
    if f.has("image_rephrase"):
        other = images.ref(f.rec["image_rephrase"], "image_rephrase", "rephrase")
        probes.append(Probe(ProbeKind.IMAGE_GENERALITY, fact.prompt, fact.target, other))
    if f.has("loc", "loc_ans"):
        probes.append(Probe(ProbeKind.TEXT_LOCALITY, f.text("loc") or "", f.text("loc_ans") or ""))
    if f.has("m_loc", "m_loc_q", "m_loc_a"):
        pic = images.ref(f.rec.get("m_loc"), "m_loc")
        probes.append(Probe(ProbeKind.IMAGE_LOCALITY, f.text("m_loc_q") or "", f.text("m_loc_a") or "", pic))
    return probes


def image_checker(root: Path | None, default: Path, options: dict[str, Any]) -> ImageChecker:
    """Roots: ``image`` (``--image-root``, default ``default``) and ``rephrase`` (option or the same)."""
    main = root if root is not None else default
    rephrase = Path(options["rephrase_image_root"]) if options.get("rephrase_image_root") else main
    return ImageChecker({"image": main, "rephrase": rephrase})


def mmedit_case(f: Fields, case_id: str, images: ImageChecker) -> EditCase:
    # MMEdit changes the answer to a question about what an image shows (not a KG entity).
    fact = edit_fact(f, images)
    return EditCase(case_id, EditType.VISUAL_SEMANTIC, fact, tuple(base_probes(f, fact, images)))


@register_benchmark(
    "mmedit",
    help="MMEdit E-VQA / E-IC JSON: mmedit:FILE --image-root COCO (options: rephrase_image_root, train)",
)
def load_mmedit(
    path: str | None, image_root: Path | None = None, skip_bad: bool = False, **options: Any
) -> Benchmark:
    opts = take_options("mmedit", options, OPTIONS)
    file = benchmark_file("mmedit", path, "path/to/vqa_eval.json")
    images = image_checker(image_root, file.parent, opts)

    def to_case(f: Fields, cid: str) -> EditCase:
        return mmedit_case(f, cid, images)

    train = decode_file(Path(opts["train"]), to_case) if opts.get("train") else None
    return make_benchmark(
        "mmedit", file, decode_file(file, to_case), images.root, skip_bad=skip_bad, train=train
    )
