"""Reader for medical multiple-choice items (``medmcq:items.json``, a JSON list or JSONL).

MedMKEB (Xu et al., "MedMKEB: A Comprehensive Knowledge Editing Benchmark for Medical Multimodal
Large Language Models", AAAI 2026) edits GMAI-MMBench-style items (Chen et al., "GMAI-MMBench",
NeurIPS 2024): an image, a question and options A-E, the answer changed to a counterfactual
option. MedMKEB's files are not public, so mmke defines this shape: ``image``, ``question``,
options as ``options: {"A": ..}`` or as top-level keys ``A``..``E`` (GMAI-MMBench's TSV columns),
``answer`` (a letter or the option's text); optional ``id``, ``category``, ``modality``,
``counterfactual``, ``rephrase``, ``image_rephrase``, ``locality`` [{question, answer, image?}],
``portability`` [{question, answer, hop}], ``adversarial`` [{type, prompt}].
The counterfactual, unless a record names it, is the other option whose text is most similar to
the answer's by all-MiniLM-L6-v2 cosine (as in MedMKEB); all option texts are embedded in one call.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mmke.data.benchmark import Benchmark
from mmke.data.formats._foreign import (
    FieldError,
    Fields,
    ImageChecker,
    benchmark_file,
    checked_text,
    decode_file,
    iter_records,
    make_benchmark,
    take_options,
)
from mmke.data.kg.counterfactual import Nearest, embed_texts
from mmke.data.mcq import render_options
from mmke.embeddings import MiniLM, TextEmbedder
from mmke.registry import register_benchmark
from mmke.types import AttackType, EditCase, EditFact, EditType, Probe, ProbeKind

OPTIONS = ("train",)
LETTERS = ("A", "B", "C", "D", "E")
MIN_OPTIONS = 2
MAX_HOP = 4


# ---------------------------------------------------------------- options


def read_options(f: Fields) -> dict[str, str]:
    """Letter -> option text, in letter order, from ``options`` or top-level ``A``..``E``.

    A null or empty option is absent (GMAI-MMBench leaves unused columns empty); the letters
    used must run from A without gaps, and no two options may have the same text.
    """
    columns = [k for k in LETTERS if f.rec.get(k) not in (None, "")]
    if f.has("options"):
        if columns:
            raise FieldError("options are given twice ('options' and keys A-E); keep one")
        raw, where = _options_object(f.rec["options"]), "options."
    else:
        raw, where = f.rec, ""
    opts = {k: checked_text(raw[k], f"{where}{k}").strip() for k in LETTERS if raw.get(k) not in (None, "")}
    if len(opts) < MIN_OPTIONS:
        raise FieldError(f"needs at least {MIN_OPTIONS} options (keys A-E or 'options'), got {len(opts)}")
    if tuple(opts) != LETTERS[: len(opts)]:
        raise FieldError(f"option letters must run from A without gaps, got {', '.join(opts)}")
    seen: dict[str, str] = {}
    for letter, text in opts.items():
        other = seen.setdefault(text.casefold(), letter)
        if other != letter:
            raise FieldError(f"options {other} and {letter} have the same text {_short(text)!r}")
    return opts


def _options_object(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise FieldError('field \'options\' must be an object {"A": text, "B": text, ...}')
    for key in value:
        if key not in LETTERS:
            raise FieldError(f"field 'options': key {_short(str(key))!r} is not a letter A-E")
    return value


def pick_option(value: Any, options: Mapping[str, str], key: str) -> str:
    """The option text that ``value`` (a letter, or an option's text) names."""
    text = checked_text(value, key).strip()
    if text in options:
        return options[text]
    if text in options.values():
        return text
    if text.upper() in options:
        return options[text.upper()]
    letters = ", ".join(options)
    if len(text) == 1 and text.upper() in LETTERS:
        raise FieldError(f"field {key!r}: letter {text!r} is not one of the options ({letters})")
    raise FieldError(f"field {key!r}: {_short(text)!r} is neither an option letter ({letters}) nor an option")


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _letter_of(text: str, options: Mapping[str, str]) -> str:
    return next(k for k, v in options.items() if v == text)


# ---------------------------------------------------------------- counterfactuals


def embed_options(files: Sequence[Path], embedder: TextEmbedder) -> Nearest:
    """Embed, in one call, the option texts of the records of ``files`` that do not name a counterfactual.

    Records that do not decode are left out here; ``decode_file`` reports them. A file where
    every record names its counterfactual never calls ``embedder`` (MiniLM is not loaded).
    """
    return embed_texts([t for file in files for t in _texts_to_embed(file)], embedder)


def _texts_to_embed(file: Path) -> Iterator[str]:
    for raw in iter_records(file):
        try:
            f = Fields(raw.value)
            if not f.has("counterfactual"):
                yield from read_options(f).values()
        except FieldError:
            continue


def counterfactual(f: Fields, answer: str, options: Mapping[str, str], nearest: Nearest) -> tuple[str, str]:
    """The counterfactual option text and what chose it (``record`` or the embedder's name)."""
    if f.has("counterfactual"):
        cf = pick_option(f.rec["counterfactual"], options, "counterfactual")
        if cf == answer:
            raise FieldError("field 'counterfactual' names the correct answer; it must be another option")
        return cf, "record"
    others = [t for t in options.values() if t != answer]
    return nearest.most_similar(answer, others), nearest.name


# ---------------------------------------------------------------- probes


def base_probes(f: Fields, fact: EditFact, images: ImageChecker) -> list[Probe]:
    """Rel, T-Gen (``rephrase``), I-Gen (``image_rephrase``), with the edit's options and target."""
    opts = fact.options
    probes = [Probe(ProbeKind.RELIABILITY, fact.prompt, fact.target, fact.image, options=opts)]
    rephrase = f.text("rephrase", required=False)
    if rephrase is not None:
        prompt = render_options(rephrase, opts)
        probes.append(Probe(ProbeKind.TEXT_GENERALITY, prompt, fact.target, fact.image, options=opts))
    if f.has("image_rephrase"):
        other = images.ref(f.rec["image_rephrase"], "image_rephrase")
        probes.append(Probe(ProbeKind.IMAGE_GENERALITY, fact.prompt, fact.target, other, options=opts))
    return probes


def _objects(f: Fields, key: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for i, item in enumerate(f.items(key)):
        where = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise FieldError(f"{where} must be an object")
        yield where, item


def locality_probes(f: Fields, images: ImageChecker) -> list[Probe]:
    """``locality`` items: T-Loc without an image, I-Loc with one (answers: the unedited model's)."""
    probes = []
    for where, item in _objects(f, "locality"):
        q = checked_text(item.get("question"), f"{where}.question")
        a = checked_text(item.get("answer"), f"{where}.answer")
        if item.get("image") is None:
            probes.append(Probe(ProbeKind.TEXT_LOCALITY, q, a))
        else:
            pic = images.ref(item["image"], f"{where}.image")
            probes.append(Probe(ProbeKind.IMAGE_LOCALITY, q, a, pic))
    return probes


def portability_probes(f: Fields, fact: EditFact) -> list[Probe]:
    """``portability`` items, asked on the edit image; ``hop`` 1-4 (default 1)."""
    probes = []
    for where, item in _objects(f, "portability"):
        q = checked_text(item.get("question"), f"{where}.question")
        a = checked_text(item.get("answer"), f"{where}.answer")
        hop = 1 if item.get("hop") is None else item["hop"]
        if isinstance(hop, bool) or not isinstance(hop, int) or not 1 <= hop <= MAX_HOP:
            raise FieldError(f"field '{where}.hop' must be an integer 1-{MAX_HOP}, got {hop!r}")
        probes.append(Probe(ProbeKind.PORTABILITY, q, a, fact.image, hop=hop))
    return probes


def adversarial_probes(f: Fields, fact: EditFact) -> list[Probe]:
    """``adversarial`` items: the attacked question, with the edit's options; target: the counterfactual."""
    probes = []
    for where, item in _objects(f, "adversarial"):
        attack = _attack(item.get("type"), f"{where}.type")
        prompt = render_options(checked_text(item.get("prompt"), f"{where}.prompt"), fact.options)
        probes.append(
            Probe(ProbeKind.ROBUSTNESS, prompt, fact.target, fact.image, attack=attack, options=fact.options)
        )
    return probes


def _attack(value: Any, key: str) -> AttackType:
    """An ``AttackType`` from its value; case, hyphens and spaces are forgiven ("Pseudo-Authority")."""
    name = checked_text(value, key).strip().lower().replace("-", "_").replace(" ", "_")
    try:
        return AttackType(name)
    except ValueError:
        known = ", ".join(a.value for a in AttackType)
        raise FieldError(f"field {key!r}: {_short(str(value))!r} is not an attack type ({known})") from None


# ---------------------------------------------------------------- records -> cases


def medmcq_case(f: Fields, case_id: str, images: ImageChecker, nearest: Nearest) -> EditCase:
    """One item: the answer changed to the counterfactual option, with every probe the record carries."""
    question = f.text("question") or ""
    options = read_options(f)
    texts = tuple(options.values())
    answer = pick_option(f.text("answer"), options, "answer")
    cf, chosen_by = counterfactual(f, answer, options, nearest)
    image = images.ref(f.text("image"), "image")
    fact = EditFact(render_options(question, texts), cf, image, answer, texts)
    probes = [
        *base_probes(f, fact, images),
        *locality_probes(f, images),
        *portability_probes(f, fact),
        *adversarial_probes(f, fact),
    ]
    meta = {
        "answer_option": _letter_of(answer, options),
        "counterfactual_option": _letter_of(cf, options),
        "counterfactual_by": chosen_by,
        **_kept(f),
    }
    return EditCase(case_id, EditType.MEDICAL_MCQ, fact, tuple(probes), meta=meta)


def _kept(f: Fields) -> dict[str, str]:
    """``id`` (as ``source_id``), ``category`` and ``modality`` when the record has them."""
    names = {"id": "source_id", "category": "category", "modality": "modality"}
    values = {name: f.text(key, required=False) for key, name in names.items()}
    return {name: value for name, value in values.items() if value is not None}


def read_medmcq(
    path: Path,
    root: Path | None,
    embedder: TextEmbedder,
    skip_bad: bool = False,
    *,
    train: Path | None = None,
) -> Benchmark:
    """The benchmark of ``path`` (and its ``train`` file), images under ``root`` (default: the file's folder).

    ``embedder`` chooses the counterfactuals records do not name (the registered loader passes MiniLM).
    """
    images = ImageChecker({"image": root if root is not None else path.parent})
    nearest = embed_options([path, *([train] if train else [])], embedder)

    def to_case(f: Fields, cid: str) -> EditCase:
        return medmcq_case(f, cid, images, nearest)

    train_decoded = decode_file(train, to_case) if train else None
    return make_benchmark(
        "medmcq", path, decode_file(path, to_case), images.root, skip_bad=skip_bad, train=train_decoded
    )


@register_benchmark(
    "medmcq",
    help="medical MCQ JSON (GMAI-MMBench/MedMKEB shape): medmcq:FILE --image-root DIR (options: train)",
)
def load_medmcq(
    path: str | None, image_root: Path | None = None, skip_bad: bool = False, **options: Any
) -> Benchmark:
    opts = take_options("medmcq", options, OPTIONS)
    file = benchmark_file("medmcq", path, "path/to/items.json")
    train = Path(opts["train"]) if opts.get("train") else None
    embedder = MiniLM(needed_by="benchmark 'medmcq' (choosing counterfactual options)")
    return read_medmcq(file, image_root, embedder, skip_bad, train=train)
