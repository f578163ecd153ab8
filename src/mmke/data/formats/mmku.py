"""Reader for MMKU-Bench's test files (``mmku:MMKU-Bench/updated/updated_test_rewrite.jsonl``).

MMKU-Bench (Fu et al., "MMKU-Bench: A Multimodal Update Benchmark for Diverse Visual Knowledge",
arXiv 2603.15117; github.com/baochenfu/MMKU-Bench) asks questions about images after knowledge
was injected, in two scenarios, each a folder with a test and a train file:
``updated/updated_test_rewrite.jsonl`` (knowledge the model had, since changed) and
``unknown/unknown_test_rewrite.jsonl`` (knowledge new to it).

Each JSONL record ``{question_id, text, image, answer, type, cnn_wiki_type}`` becomes one case:
the edit ``text`` + ``image`` -> ``answer`` (no pre-edit answer: the data has no old answer), one
RELIABILITY probe asking the same, ``edit_type`` VISUAL_ENTITY and ``task`` the scenario
(option ``scenario=updated|unknown``; by default read from the file's name, else its folder).
``meta`` keeps ``question_id``, ``type`` and ``cnn_wiki_type`` (wiki / news) when present.

Verified in the public code (inference.py, evaluation/eval_acc_f1.py, evaluation/tools.py,
evaluation/all_type_score.py): the field names; the prompt is ``text`` with the image; the
output is free generation, at most 64 new tokens, greedy; the whole output is scored against the
one ``answer`` by VQAEval whole-word containment ("VQA accuracy") and SQuAD token F1; results
are split by ``cnn_wiki_type`` and ``type``. ``question_id`` keys the scoring, so it must be
unique. ``image`` is opened as written (inference.py joins it to nothing, so it is relative to
the folder inference runs in); here it is relative to ``--image-root``, which defaults to the
file's folder. To score as MMKU-Bench does, run with
``evaluation=[teacher_forced,generation] max_new_tokens=64``: the ``generated_vqa`` and
``generated_f1`` sections of the records and summary are its two numbers.

Inferred or unknown: the train files' schema (``*_train_rewrite.json``, ms-swift / EasyEdit
input) is not published, so they are not read; option ``train=FILE`` takes a file of records in
the test shape above (for IKE's demonstrations and trainable editors). How train items link to
test questions, and the old answer of an updated fact, are not known either.
"""

from __future__ import annotations

from collections.abc import Callable
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
from mmke.errors import ConfigError
from mmke.registry import register_benchmark
from mmke.types import EditCase, EditFact, EditType, Probe, ProbeKind

OPTIONS = ("scenario", "train")
SCENARIOS = ("updated", "unknown")
#: Record fields kept in a case's meta when present (the keys MMKU-Bench's scripts split results by).
META_FIELDS = ("type", "cnn_wiki_type")


# ---------------------------------------------------------------- scenario


def scenario_of(file: Path, option: Any = None) -> str:
    """The scenario: the option if given, else the one the file's name or its folder starts with."""
    if option is not None:
        if option not in SCENARIOS:
            raise ConfigError(f"benchmark option scenario={option!r}: expected 'updated' or 'unknown'")
        return str(option)
    by_name, by_folder = _named(file.name), _named(file.parent.name)
    if by_name and by_folder and by_name != by_folder:
        raise ConfigError(
            f"{file}: the file's name says {by_name!r} but its folder says {by_folder!r}; "
            "set benchmark_options.scenario=updated or unknown"
        )
    found = by_name or by_folder
    if found is None:
        raise ConfigError(
            f"{file}: cannot tell the MMKU-Bench scenario from the file's name or folder; "
            "set benchmark_options.scenario=updated or unknown"
        )
    return found


def _named(name: str) -> str | None:
    return next((s for s in SCENARIOS if name.lower().startswith(s)), None)


# ---------------------------------------------------------------- records -> cases


def mmku_case(f: Fields, case_id: str, images: ImageChecker, scenario: str) -> EditCase:
    """One test question: ``text`` + ``image`` -> ``answer``, asked once more as the reliability probe."""
    question_id = f.text("question_id") or ""
    fact = EditFact(
        prompt=f.text("text") or "",
        target=f.text("answer") or "",
        image=images.ref(f.text("image"), "image"),
    )
    probe = Probe(ProbeKind.RELIABILITY, fact.prompt, fact.target, fact.image)
    meta = {"question_id": question_id, **_kept(f)}
    return EditCase(case_id, EditType.VISUAL_ENTITY, fact, (probe,), meta=meta, task=scenario)


def _kept(f: Fields) -> dict[str, str]:
    values = {key: f.text(key, required=False) for key in META_FIELDS}
    return {key: value for key, value in values.items() if value is not None}


def _case_maker(images: ImageChecker, scenario: str) -> Callable[[Fields, str], EditCase]:
    """``mmku_case`` that also refuses a repeated ``question_id`` (MMKU-Bench scores by it)."""
    first: dict[str, str] = {}

    def to_case(f: Fields, cid: str) -> EditCase:
        case = mmku_case(f, cid, images, scenario)
        qid = case.meta["question_id"]
        if first.setdefault(qid, cid) != cid:
            raise FieldError(f"field 'question_id': {qid!r} is already the id of case {first[qid]}")
        return case

    return to_case


def _train(file: Path, images: ImageChecker, scenario: str) -> Decoded:
    decoded = decode_file(file, _case_maker(images, scenario))
    if decoded.problems and not decoded.cases:
        # most likely MMKU's own *_train_rewrite.json, whose schema is unpublished
        raise ConfigError(
            f"benchmark option train={file}: no record has the test-record shape "
            f"(question_id, text, image, answer); first problem: {decoded.problems[0]}"
        )
    return decoded


@register_benchmark(
    "mmku",
    help="MMKU-Bench test JSONL: mmku:MMKU-Bench/updated/updated_test_rewrite.jsonl --image-root MMKU-Bench "
    "(options: scenario, train); score with evaluation=[teacher_forced,generation] max_new_tokens=64",
)
def load_mmku(
    path: str | None, image_root: Path | None = None, skip_bad: bool = False, **options: Any
) -> Benchmark:
    opts = take_options("mmku", options, OPTIONS)
    file = benchmark_file("mmku", path, "MMKU-Bench/updated/updated_test_rewrite.jsonl")
    scenario = scenario_of(file, opts.get("scenario"))
    images = ImageChecker({"image": image_root if image_root is not None else file.parent})
    train = _train(Path(opts["train"]), images, scenario) if opts.get("train") else None
    decoded = decode_file(file, _case_maker(images, scenario))
    return make_benchmark("mmku", file, decoded, images.root, skip_bad=skip_bad, train=train)
