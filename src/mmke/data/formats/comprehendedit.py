"""Reader for ComprehendEdit (``comprehendedit:ComprehendEdit_test.json --image-root DATA_DIR``).

Paper: Ma et al., "ComprehendEdit: A Comprehensive Dataset and Evaluation Framework for
Multimodal Knowledge Editing", AAAI 2025 (arXiv 2412.12821; github.com/yaohui120/ComprehendEdit).
Files (each one JSON list, the real ones on one line): ``ComprehendEdit_test.json`` (the edits,
and the pool of KGI neighbours), ``ComprehendEdit_ori_right.json`` (the pool of KPI neighbours:
samples the unedited model answered right) and ``ComprehendEdit_train.json`` (option ``train``).
Image paths (``GQA/images/…``, ``val2014/…`` for M-Loc) are relative to ``--image-root``
(default: the file's folder). Field mapping (docs/research/issue25_comprehendedit_cckeb.md §1):

* ``question`` + ``image`` -> ``answer``: the edit (no pre-edit answer in the data), and Rel;
  ``rephrase`` -> T-Gen. There is no rephrased image, so no I-Gen probe (EasyEdit copies Rel).
* ``locality_prompt`` -> ``locality_ground_truth``: T-Loc (both authors' loaders put the prompt
  in the answer's place; the record's answer is taken here). ``multimodal_locality_image`` /
  ``_prompt`` / ``_ground_truth``: I-Loc.
* ``Category`` -> the case's task, verbatim; ``source`` and ``pid`` -> meta ``source_dataset``
  and ``pid`` (meta ``source`` is the record's ``file:line``).
* KGI: ``img_topk``, ``txt_topk`` (first ``k``) and ``img_last_topk``, ``txt_last_topk`` (last
  ``k``, as the loader slices them) are positions in the test file; each gives an
  in-domain-generality probe with that record's question, image and answer, ``group`` = the key.
* KPI: ``ori_rt_<key>``, the same slices into the ori_right file, give in-domain-locality probes
  (``group`` = ``<key>``). Their target is the record's answer only to anchor the span: mmke
  scores them against the unedited model, as the authors do with ``ori_pred_*`` token ids
  (kept for BLIP-2 and MiniGPT-4 only, so not read).

Verified in the authors' loader and trainer: the fields, the slices, the pools, KGI's target
(the neighbour's answer), the per-source templates (option ``source_templates``), the skip of
records whose answer is ``""``. Inferred: that neighbour indices count every record of the file
(the loader indexes the kept records, which is the same when none is skipped, as its own
``test_data[step]`` lookup assumes); ``k`` = 4 by default, the largest k its ``print_result_k``
reports (which cells the paper's tables show is not in the code).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmke.data.benchmark import Benchmark
from mmke.data.checks import json_type
from mmke.data.formats._foreign import (
    Decoded,
    FieldError,
    Fields,
    ImageChecker,
    LeftOut,
    benchmark_file,
    bool_option,
    checked_text,
    decode_file,
    iter_records,
    make_benchmark,
    take_options,
)
from mmke.data.formats.mmedit import image_checker
from mmke.errors import ConfigError
from mmke.registry import register_benchmark
from mmke.types import EditCase, EditFact, EditType, Probe, ProbeKind, Sample

log = logging.getLogger(__name__)

OPTIONS = ("k", "ori_right", "train", "source_templates")
ORI_RIGHT = "ComprehendEdit_ori_right.json"
#: The lists hold 5 neighbours (the loader's topk=5); print_result_k reports k = 1..4.
MAX_K, DEFAULT_K = 5, 4
#: KGI neighbour lists (positions in the test file); KPI lists are these with ``KPI_PREFIX``.
NEIGHBOUR_KEYS = ("img_topk", "txt_topk", "img_last_topk", "txt_last_topk")
KPI_PREFIX = "ori_rt_"
#: The authors' prompt per lower-cased ``source``; M-Loc questions always take the GQA one.
TEMPLATES = {
    "gqa": "Question: {} Short answer:",
    "tallyqa": "Question: {} Answer with a number. Short answer:",
    "vsr": "Question: Is this description true or false? Description: {} Short answer:",
    "textvqa": "Question: {} Short answer:",
    "mathvista": "{} Short answer:",
}
MLOC_SOURCE = "gqa"
RAW = "{}"


# ---------------------------------------------------------------- prompts


def template(f: Fields, on: bool) -> str:
    """The record's prompt template: its ``source``'s when ``on``, else the raw question."""
    if not on:
        return RAW
    source = f.text("source") or ""
    found = TEMPLATES.get(source.lower())
    if found is None:
        known = ", ".join(TEMPLATES)
        raise FieldError(f"field 'source' is {source!r}; source_templates knows {known}")
    return found


def ask(tpl: str, question: str) -> str:
    """``question`` in its template (only ``tpl`` is parsed, so braces in a question stay as they are)."""
    return tpl.format(question)


# ---------------------------------------------------------------- neighbour pools


@dataclass
class NeighbourPool:
    """The records of one ComprehendEdit file by position, each read (once) as a neighbour sample."""

    name: str
    records: Sequence[Any]
    images: ImageChecker
    templates: bool
    _seen: dict[int, Sample | str] = field(default_factory=dict, repr=False)

    def sample(self, index: int, key: str) -> Sample:
        """Record ``index`` as question (+ template) + image -> answer; a FieldError naming ``key``."""
        if not 0 <= index < len(self.records):
            raise FieldError(
                f"field {key!r}: index {index} is out of range ({self.name} has {len(self.records)} records)"
            )
        found = self._seen.get(index)
        if found is None:
            found = self._seen[index] = self._read(index)
        if isinstance(found, str):
            raise FieldError(
                f"field {key!r}: index {index} points at an unreadable record of {self.name} ({found})"
            )
        return found

    def _read(self, index: int) -> Sample | str:
        try:
            f = Fields(self.records[index])
            tpl = template(f, self.templates)
            question, answer = f.text("question") or "", f.text("answer") or ""
            return Sample(ask(tpl, question), answer, self.images.ref(f.rec.get("image"), "image"))
        except FieldError as e:
            return str(e)


def read_pool(path: Path, images: ImageChecker, templates: bool) -> NeighbourPool:
    """Every record of ``path`` (undecoded until a neighbour list names it)."""
    return NeighbourPool(path.name, [raw.value for raw in iter_records(path)], images, templates)


@dataclass(frozen=True)
class Neighbourhood:
    """Where a test record's neighbour lists point: the test file (KGI) and ori_right (KPI, optional)."""

    k: int
    test: NeighbourPool
    ori_right: NeighbourPool | None


def indices(f: Fields, key: str, k: int) -> list[int]:
    """The ``k`` neighbours the loader uses: the first k of a list, the last k of a ``*_last_*`` one."""
    items = f.items(key)
    for i, value in enumerate(items):
        if isinstance(value, bool) or not isinstance(value, int):
            raise FieldError(f"field {key!r}: item {i} must be an integer index, got {json_type(value)}")
    return items[-k:] if "_last_" in key else items[:k]


def neighbour_probes(f: Fields, hood: Neighbourhood) -> list[Probe]:
    """KGI probes from the test pool and (when ori_right is known) KPI probes from ori_right."""
    probes = []
    pools = [(ProbeKind.IN_DOMAIN_GENERALITY, "", hood.test)]
    if hood.ori_right is not None:
        pools.append((ProbeKind.IN_DOMAIN_LOCALITY, KPI_PREFIX, hood.ori_right))
    for kind, prefix, pool in pools:
        for group in NEIGHBOUR_KEYS:
            key = prefix + group
            for index in indices(f, key, hood.k):
                s = pool.sample(index, key)
                probes.append(Probe(kind, s.prompt, s.target, s.image, group=group))
    return probes


# ---------------------------------------------------------------- records -> cases


def edit_fact(f: Fields, images: ImageChecker, tpl: str) -> EditFact:
    """``question`` (+ template) + ``image`` -> ``answer``; the data has no pre-edit answer."""
    if f.rec.get("answer") == "":
        raise LeftOut  # the authors' loader skips a record whose answer is empty
    question = ask(tpl, f.text("question") or "")
    return EditFact(question, f.text("answer") or "", images.ref(f.rec.get("image"), "image"))


def own_probes(f: Fields, fact: EditFact, images: ImageChecker, tpl: str, templates: bool) -> list[Probe]:
    """Rel, T-Gen (``rephrase``), T-Loc and I-Loc from the record's own fields (absent ones skipped)."""
    probes = [Probe(ProbeKind.RELIABILITY, fact.prompt, fact.target, fact.image)]
    rephrase = f.text("rephrase", required=False)
    if rephrase is not None:
        probes.append(Probe(ProbeKind.TEXT_GENERALITY, ask(tpl, rephrase), fact.target, fact.image))
    if f.has("locality_prompt", "locality_ground_truth"):
        loc_q, loc_a = f.text("locality_prompt") or "", f.text("locality_ground_truth") or ""
        probes.append(Probe(ProbeKind.TEXT_LOCALITY, loc_q, loc_a))  # raw NQ question, as upstream
    mloc = ("multimodal_locality_image", "multimodal_locality_prompt", "multimodal_locality_ground_truth")
    if f.has(*mloc):
        pic = images.ref(f.rec.get(mloc[0]), mloc[0])
        q = ask(TEMPLATES[MLOC_SOURCE] if templates else RAW, f.text(mloc[1]) or "")
        probes.append(Probe(ProbeKind.IMAGE_LOCALITY, q, f.text(mloc[2]) or "", pic))
    return probes


def _meta(f: Fields) -> dict[str, str]:
    """``source`` (GQA, TallyQA…) as ``source_dataset`` and ``pid``, when the record has them."""
    names = {"source": "source_dataset", "pid": "pid"}
    return {name: checked_text(f.rec[key], key) for key, name in names.items() if f.rec.get(key) is not None}


def comprehendedit_case(
    f: Fields, case_id: str, images: ImageChecker, templates: bool, hood: Neighbourhood | None
) -> EditCase:
    """One record: its own probes, then its neighbours' (none for train records: ``hood`` None)."""
    tpl = template(f, templates)
    fact = edit_fact(f, images, tpl)
    probes = own_probes(f, fact, images, tpl, templates)
    if hood is not None:
        probes += neighbour_probes(f, hood)
    task = f.text("Category", required=False)
    # ComprehendEdit edits the answer to a question about what an image shows, as MMEdit's VQA.
    return EditCase(case_id, EditType.VISUAL_SEMANTIC, fact, tuple(probes), meta=_meta(f), task=task)


def decode(path: Path, images: ImageChecker, templates: bool, hood: Neighbourhood | None) -> Decoded:
    """The cases of ``path``; records with an empty answer are left out, not reported as bad."""
    return decode_file(path, lambda f, cid: comprehendedit_case(f, cid, images, templates, hood))


# ---------------------------------------------------------------- options


def _k_option(value: Any) -> int:
    if value is None:
        return DEFAULT_K
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_K:
        return value
    raise ConfigError(f"benchmark option k={value!r}: expected an integer 1-{MAX_K} (neighbours per list)")


def ori_right_file(test_file: Path, option: Any) -> Path | None:
    """The KPI pool: the option's file (which must exist), else the sibling file if there is one."""
    if option is None:
        sibling = test_file.parent / ORI_RIGHT
        if sibling.is_file():
            return sibling
        log.warning("no %s beside %s: no KPI (in-domain locality) probes", ORI_RIGHT, test_file)
        return None
    path = Path(option)
    if not path.is_file():
        raise ConfigError(f"benchmark option ori_right: file {path} not found")
    return path


@register_benchmark(
    "comprehendedit",
    help="ComprehendEdit JSON: comprehendedit:ComprehendEdit_test.json --image-root DATA_DIR "
    "(options: k, ori_right, train, source_templates)",
)
def load_comprehendedit(
    path: str | None, image_root: Path | None = None, skip_bad: bool = False, **options: Any
) -> Benchmark:
    opts = take_options("comprehendedit", options, OPTIONS)
    file = benchmark_file("comprehendedit", path, "path/to/ComprehendEdit_test.json")
    k = _k_option(opts.get("k"))
    templates = bool_option(opts, "source_templates", False)
    images = image_checker(image_root, file.parent, {})
    ori = ori_right_file(file, opts.get("ori_right"))
    pools = read_pool(file, images, templates), (read_pool(ori, images, templates) if ori else None)
    decoded = decode(file, images, templates, Neighbourhood(k, *pools))
    train = decode(Path(opts["train"]), images, templates, None) if opts.get("train") else None
    return make_benchmark("comprehendedit", file, decoded, images.root, skip_bad=skip_bad, train=train)
