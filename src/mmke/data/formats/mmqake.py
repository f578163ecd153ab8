"""Reader for MMQAKE (``mmqake:convert_eval_multihop_with_re_questions_with_wiki_new.json``).

Paper: Li Yuan et al., "Hybrid-DMKG: A Hybrid Reasoning Framework over Dynamic Multimodal
Knowledge Graphs for Multimodal Multihop QA with Knowledge Editing" (AAAI 2026, arXiv
2512.00881; github.com/YuanLi95/Hybrid-DMKG), which builds MMQAKE on VLKEB's multi-hop
records. Images are VLKEB's (``--image-root VLKEB_images/mmkb_images``); the baselines train
on VLKEB's ``train.json`` (option ``train``). Field mapping:

* the VLKEB / MMEdit base fields -> the edit and Rel, T-Gen, I-Gen, T-Loc, I-Loc
  (``mmedit.edit_fact`` / ``base_probes``), edit type visual entity;
* ``port_new[i]`` = ``{"port_type": "1-hop".."4-hop", "triple1": .., .., "triple{h+1}": ..}``:
  one multi-hop chain of VLKEB hop ``h`` (``h + 1`` facts counting the edit; the paper's
  "(h+1)-hop"). ``triple{h+1}`` is the final question: ``rewrite_question`` (a list of
  paraphrases), ``answer``, ``answer_ali`` (other accepted answers, optional). Each paraphrase
  ``v`` is a portability probe with ``group="chain{h}"``, ``variant=v``, ``hop=h``;
* the chain's sub-questions for paraphrase ``v`` (``HOP_STEP`` probes of that group and variant):
  step 1 is the edit itself (``src`` -> ``alt``), then ``triple2..triple{h}``'s
  ``rewrite_question[v]`` (``[0]`` when it has fewer paraphrases) -> ``answer`` / ``answer_ali``.
  ``triple1`` and other keys inside a triple (``post``…) are not read.

M-Acc counts a chain when some paraphrase's final answer is right; H-Acc when that paraphrase's
sub-questions are right too (``mmke.eval.metrics.chain_accuracy``). Options: ``image=rephrased``
asks every chain question on ``image_rephrase`` (the paper's "Rephrased" setting; the loader's
``hop=999``, against ``100`` for ``original``), ``aliases=false`` drops ``answer_ali`` (App. D).

Verified in the baselines' loader (``baseline_easyeditor/dataset/coco_caption.py``) and scoring
(``trainer/MultimodalTrainer.py::edit_step``): records without ``port_new`` or with ``alt == ""``
are skipped (here: left out silently, not bad records); the final question is ``triple{h+1}``
with ``rewrite_question`` / ``answer`` / ``answer_ali``; step 1 is ``src`` -> ``alt``; later steps
are ``triple2..`` asked with the final question's paraphrase index on the chain's image.
Inferred (the data file is not in the public snapshot): the inner shape of a triple beyond
those keys. The loader takes the final triple by the entry's position (``triple{i+2}``), this
reader by its ``port_type``; they agree when entries run 1-hop, 2-hop, … in order, as the
paper's chain counts (2-hop 1,278 ≥ 3-hop 1,238 ≥ …) suggest. Not reproduced: decoding exactly
the target's token count, and the loose "prediction is a substring of a gold answer" match.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmke.data.benchmark import Benchmark
from mmke.data.checks import MAX_LIST_ITEMS, json_type
from mmke.data.formats._foreign import (
    FieldError,
    Fields,
    ImageChecker,
    LeftOut,
    benchmark_file,
    bool_option,
    checked_text,
    decode_file,
    make_benchmark,
    take_options,
)
from mmke.data.formats.mmedit import OPTIONS as MMEDIT_OPTIONS
from mmke.data.formats.mmedit import base_probes, edit_fact, image_checker
from mmke.data.formats.vlkeb import port_hop
from mmke.errors import ConfigError
from mmke.registry import register_benchmark
from mmke.types import EditCase, EditFact, EditType, ImageRef, Probe, ProbeKind

OPTIONS = (*MMEDIT_OPTIONS, "image", "aliases")
#: The paper's two settings: chain questions on the edit image or on its visual rephrase.
IMAGE_SETTINGS = ("original", "rephrased")


@dataclass(frozen=True)
class Settings:
    """The reader's options once checked: which image the chains use, whether aliases count."""

    rephrased: bool = False
    aliases: bool = True


@dataclass(frozen=True)
class Question:
    """One triple's question: its paraphrases, its answer and the answer's other names."""

    paraphrases: tuple[str, ...]
    answer: str
    aliases: tuple[str, ...]

    def asked(self, variant: int) -> str:
        """The paraphrase that goes with the final question's ``variant`` (the first if it has fewer)."""
        return self.paraphrases[variant if variant < len(self.paraphrases) else 0]


@dataclass(frozen=True)
class Chain:
    """One ``port_new`` entry: VLKEB hop ``hop``, sub-questions ``triple2..``, then the final one."""

    hop: int
    steps: tuple[Question, ...]
    final: Question


# ---------------------------------------------------------------- fields -> chains


def _list(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise FieldError(f"field {key!r} must be a list, got {json_type(value)}")
    if len(value) > MAX_LIST_ITEMS:
        raise FieldError(f"field {key!r} has {len(value)} items (limit {MAX_LIST_ITEMS})")
    return value


def _aliases(value: Any, key: str) -> tuple[str, ...]:
    """``answer_ali`` (absent -> none); blank names are left out, since "" would match any answer."""
    if value is None:
        return ()
    names = enumerate(_list(value, key))
    return tuple(
        checked_text(v, f"{key}[{i}]") for i, v in names if not (isinstance(v, str) and not v.strip())
    )


def read_question(entry: dict[str, Any], i: int, k: int) -> Question:
    """``port_new[i].triple{k}`` as a Question."""
    where = f"port_new[{i}].triple{k}"
    triple = entry.get(f"triple{k}")
    if triple is None:
        raise FieldError(f"field {where!r} missing")
    if not isinstance(triple, dict):
        raise FieldError(f"field {where!r} must be an object, got {json_type(triple)}")
    for key in ("rewrite_question", "answer"):
        if triple.get(key) is None:
            raise FieldError(f"field '{where}.{key}' missing")
    asked = _list(triple["rewrite_question"], f"{where}.rewrite_question")
    if not asked:
        raise FieldError(f"field '{where}.rewrite_question' is empty")
    return Question(
        paraphrases=tuple(checked_text(q, f"{where}.rewrite_question[{v}]") for v, q in enumerate(asked)),
        answer=checked_text(triple["answer"], f"{where}.answer"),
        aliases=_aliases(triple.get("answer_ali"), f"{where}.answer_ali"),
    )


def read_chain(entry: Any, i: int) -> Chain:
    """``port_new[i]``: its hop from ``port_type`` and the triples that hop needs."""
    where = f"port_new[{i}]"
    if not isinstance(entry, dict):
        raise FieldError(f"{where} must be an object")
    hop = port_hop(entry.get("port_type"), where)
    steps = tuple(read_question(entry, i, k) for k in range(2, hop + 1))
    return Chain(hop, steps, read_question(entry, i, hop + 1))


def read_chains(f: Fields) -> list[Chain]:
    """Every ``port_new`` chain; two of one hop would share a group, so that is an error."""
    chains: list[Chain] = []
    for i, entry in enumerate(f.items("port_new")):
        chain = read_chain(entry, i)
        if any(c.hop == chain.hop for c in chains):
            raise FieldError(f"port_new[{i}]: a second '{chain.hop}-hop' chain")
        chains.append(chain)
    return chains


# ---------------------------------------------------------------- chains -> probes


def chain_probes(chain: Chain, edit: EditFact, image: ImageRef | None, aliases: bool) -> list[Probe]:
    """Per paraphrase ``v``: the final question, then its sub-questions (step 1: the edit)."""
    group, hop = f"chain{chain.hop}", chain.hop

    def ask(kind: ProbeKind, prompt: str, target: str, names: tuple[str, ...], v: int) -> Probe:
        kept = names if aliases else ()
        return Probe(kind, prompt, target, image, hop=hop, aliases=kept, group=group, variant=v)

    final = chain.final
    probes: list[Probe] = []
    for v, prompt in enumerate(final.paraphrases):
        probes.append(ask(ProbeKind.PORTABILITY, prompt, final.answer, final.aliases, v))
        probes.append(ask(ProbeKind.HOP_STEP, edit.prompt, edit.target, (), v))
        probes += [ask(ProbeKind.HOP_STEP, s.asked(v), s.answer, s.aliases, v) for s in chain.steps]
    return probes


def chain_image(f: Fields, edit: EditFact, images: ImageChecker, rephrased: bool) -> ImageRef | None:
    """The image every chain question is asked on: the edit's, or ``image_rephrase`` when rephrased."""
    if not rephrased:
        return edit.image
    if not f.has("image_rephrase"):
        raise FieldError("field 'image_rephrase' missing (option image=rephrased asks the chains on it)")
    return images.ref(f.rec["image_rephrase"], "image_rephrase", "rephrase")


def mmqake_case(f: Fields, case_id: str, images: ImageChecker, settings: Settings) -> EditCase:
    """The VLKEB edit and base probes, then every chain's probes."""
    if "port_new" not in f.rec or f.rec.get("alt") == "":
        raise LeftOut  # MMQAKE's loader skips it
    fact = edit_fact(f, images)
    image = chain_image(f, fact, images, settings.rephrased)
    chains = [p for c in read_chains(f) for p in chain_probes(c, fact, image, settings.aliases)]
    return EditCase(case_id, EditType.VISUAL_ENTITY, fact, (*base_probes(f, fact, images), *chains))


def train_case(f: Fields, case_id: str, images: ImageChecker) -> EditCase:
    """A VLKEB ``train.json`` record: the edit and its base probes (it has no chains)."""
    fact = edit_fact(f, images)
    return EditCase(case_id, EditType.VISUAL_ENTITY, fact, tuple(base_probes(f, fact, images)))


# ---------------------------------------------------------------- the reader


def read_settings(opts: dict[str, Any]) -> Settings:
    """The ``image`` and ``aliases`` options, checked (a one-line ConfigError for a bad value)."""
    image = opts.get("image", "original")
    if image not in IMAGE_SETTINGS:
        raise ConfigError(f"benchmark option image={image!r}: expected one of {', '.join(IMAGE_SETTINGS)}")
    return Settings(rephrased=image == "rephrased", aliases=bool_option(opts, "aliases", True))


@register_benchmark(
    "mmqake",
    help="MMQAKE JSON (Hybrid-DMKG): mmqake:convert_eval_multihop_with_re_questions_with_wiki_new.json "
    "--image-root VLKEB_images/mmkb_images (options: image=original|rephrased, aliases, "
    "rephrase_image_root, train)",
)
def load_mmqake(
    path: str | None, image_root: Path | None = None, skip_bad: bool = False, **options: Any
) -> Benchmark:
    opts = take_options("mmqake", options, OPTIONS)
    settings = read_settings(opts)
    file = benchmark_file(
        "mmqake", path, "path/to/convert_eval_multihop_with_re_questions_with_wiki_new.json"
    )
    images = image_checker(image_root, file.parent, opts)
    decoded = decode_file(file, lambda f, cid: mmqake_case(f, cid, images, settings))
    train = (
        decode_file(Path(opts["train"]), lambda f, cid: train_case(f, cid, images))
        if opts.get("train")
        else None
    )
    return make_benchmark("mmqake", file, decoded, images.root, skip_bad=skip_bad, train=train)
