"""The item steps of a benchmark build: read rows, choose counterfactuals, rephrase, mine image pairs,
add multi-hop, locality and adversarial questions, review, and write the benchmark.

Items are records of the ``medmcq`` shape (image, question, options, answer, counterfactual,
rephrase, image_rephrase, locality, portability, adversarial), so the written ``items.json``
reads back with ``medmcq:`` and ``cases.jsonl`` with ``native:``. Settings are documented on
each step; ``mmke build STEP --help`` lists them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmke.data.build.pipeline import Context, Item, item_step
from mmke.data.checks import check_image_path
from mmke.data.images import ImageStore
from mmke.data.kg import adversarial, counterfactual, multihop
from mmke.data.mcq import render_options
from mmke.data.schema import write_cases
from mmke.data.seeding import rng_for
from mmke.errors import BadRecordError, ConfigError
from mmke.types import ImageRef

LETTERS = ("A", "B", "C", "D", "E")


# ---------------------------------------------------------------- reading


@item_step("read_mcq_csv", cached=False)
def read_mcq_csv(
    ctx: Context, items: list[Item], path: str, image_root: str = ".", sep: str = "|"
) -> list[Item]:
    """Rows (id?, image, question, options joined by ``sep`` or columns A-E, answer, category?) -> items.

    Images are checked (inside ``image_root``, decodable) and copied to the same path under OUT.
    """
    file, root = ctx.input(path), ctx.input(image_root)
    try:
        with open(file, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise BadRecordError(f"{file}: cannot read ({e.strerror})") from None
    out = [_row_item(file, root, ctx.out, row, n, sep) for n, row in enumerate(rows, 2)]
    ids = [x["id"] for x in out]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise BadRecordError(f"{file}: duplicate id(s) {dup}")
    return out


def _row_item(file: Path, root: Path, out: Path, row: Mapping[str, str | None], line: int, sep: str) -> Item:
    rid = (row.get("id") or "").strip() or f"row{line - 1}"
    where = f"{file}:{line} ({rid})"

    def text(key: str) -> str:
        value = (row.get(key) or "").strip()
        if not value:
            raise BadRecordError(f"{where}: field {key!r} is missing or empty")
        return value

    if row.get("options"):
        texts = [t.strip() for t in text("options").split(sep) if t.strip()]
    else:
        texts = [(row.get(k) or "").strip() for k in LETTERS if (row.get(k) or "").strip()]
    if len(texts) < 2 or len(set(texts)) != len(texts):
        raise BadRecordError(f"{where}: needs at least two distinct options, got {texts}")
    options = dict(zip(LETTERS, texts, strict=False))
    answer = text("answer")
    answer = options.get(answer, answer)
    if answer not in texts:
        raise BadRecordError(f"{where}: answer {answer!r} is not one of the options")
    image = _copy_image(text("image"), root, out, where)
    item: Item = {
        "id": rid,
        "image": image,
        "question": text("question"),
        "options": options,
        "answer": answer,
    }
    if (row.get("category") or "").strip():
        item["category"] = (row.get("category") or "").strip()
    return item


def _copy_image(rel: str, root: Path, out: Path, where: str) -> str:
    """Check ``rel`` under ``root`` and copy it to ``OUT/rel``; returns ``rel`` (now a path under OUT)."""
    why = check_image_path(rel, root)
    if why:
        raise BadRecordError(f"{where}: {why}")
    try:
        ImageStore(root).open(ImageRef(rel))
    except BadRecordError as e:
        raise BadRecordError(f"{where}: {e}") from None
    dest = out / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / rel, dest)
    return rel


def _require(items: list[Item], key: str, step: str, before: str) -> None:
    """A clear error when an earlier step this one needs has not run."""
    missing = [x["id"] for x in items if key not in x]
    if missing:
        raise ConfigError(f"step {step!r}: item {missing[0]!r} has no {key!r}; run {before!r} before it")


# ---------------------------------------------------------------- counterfactuals


@item_step("counterfactual")
def choose_counterfactual(
    ctx: Context,
    items: list[Item],
    strategy: str = "nearest_option",
    kg: str | None = None,
    type_relation: str = "is_a",
) -> list[Item]:
    """``nearest_option``: the other option most similar to the answer (all-MiniLM-L6-v2, MedMKEB);
    ``matching``: items with a ``subject`` in the KG get a same-type entity by shared relations (VLKEB)."""
    if strategy == "nearest_option":
        return _nearest_options(items)
    if strategy == "matching":
        if kg is None:
            raise ConfigError("step 'counterfactual': strategy 'matching' needs kg: FILE.tsv")
        return _matched(ctx, items, multihop.TripleGraph.read_tsv(ctx.input(kg)), type_relation)
    raise ConfigError(f"step 'counterfactual': unknown strategy {strategy!r} (nearest_option, matching)")


def _nearest_options(items: list[Item]) -> list[Item]:
    from mmke.embeddings import MiniLM

    todo = [x for x in items if "counterfactual" not in x]
    nearest = counterfactual.embed_texts(
        [t for x in todo for t in x["options"].values()], MiniLM(needed_by="build step 'counterfactual'")
    )
    for x in todo:
        others = [t for t in x["options"].values() if t != x["answer"]]
        x["counterfactual"] = nearest.most_similar(x["answer"], others)
        x["counterfactual_by"] = nearest.name
    return items


def _matched(ctx: Context, items: list[Item], graph: multihop.TripleGraph, type_relation: str) -> list[Item]:
    type_of = {s: o for s, r, o in graph.triples if r == type_relation}
    rels: dict[str, set[str]] = {}
    for s, r, _ in graph.triples:
        if r != type_relation:
            rels.setdefault(s, set()).add(r)
    subjects = [x.get("subject", "") for x in items]
    missing = [x["id"] for x, s in zip(items, subjects, strict=True) if s not in type_of]
    if missing:
        raise BadRecordError(f"items {missing[:5]}: no 'subject' with a {type_relation!r} type in the KG")
    frozen = {k: frozenset(v) for k, v in rels.items()}
    chosen = counterfactual.match_entities(subjects, type_of, frozen, rng_for(ctx.seed, "cf-match"))
    for x in items:
        x["counterfactual"], x["counterfactual_by"] = chosen[x["subject"]], "matching"
    return items


# ---------------------------------------------------------------- rephrases


@item_step("rephrase")
def rephrase(
    ctx: Context, items: list[Item], generator: Mapping[str, Any] | None = None, retries: int = 2
) -> list[Item]:
    """A rephrased question per item (T-Generality) from a text generator (templates, local, http)."""
    asks = [("rephrase", {"question": x["question"], "n": "0"}) for x in items]
    for x, text in zip(
        items, _generate(ctx, "rephrase", asks, [x["id"] for x in items], generator, retries), strict=True
    ):
        if text:
            x["rephrase"] = text
    return items


def _generate(
    ctx: Context,
    step: str,
    asks: Sequence[tuple[str, dict[str, str]]],
    ids: Sequence[str],
    generator: Mapping[str, Any] | None,
    retries: int,
) -> list[str | None]:
    """Outputs of (task, fields) requests, cached in ``.build``; failures reported under ``ids``."""
    from mmke.data.build import generate as g

    gen = g.generator_from_config(generator or {"backend": "templates"})
    requests = [g.Request.of(task, **fields) for task, fields in asks]
    cache = g.GenerationCache(ctx.work / "generations.jsonl")
    result = g.generate_all(gen, requests, retries=retries, cache=cache)
    ctx.report_failures(
        step, [{"item": ids[f.index], "error": f.error, "attempts": f.attempts} for f in result.failures]
    )
    return result.outputs


# ---------------------------------------------------------------- image neighbours


@item_step("image_neighbours")
def image_neighbours(
    ctx: Context,
    items: list[Item],
    encoder: str = "world",
    group_by: str = "answer",
    min_generality: float = -1.0,
    max_locality: float = 0.999,
) -> list[Item]:
    """Same-group other images for I-Generality, most similar other-group images for hard I-Locality.

    Images are embedded by ``encoder`` (a bundled model name or a model directory; the
    projector's pooled output). A pair below ``min_generality`` cosine is not used; a locality
    image above ``max_locality`` (a near duplicate) is skipped. Similarities are kept for review.
    """
    paths = sorted({x["image"] for x in items})
    vecs = _embed_images(ctx, paths, encoder)
    index = {p: i for i, p in enumerate(paths)}
    sims = vecs @ vecs.T  # (P, P)
    for x in items:
        row = sims[index[x["image"]]]
        same = [y for y in items if y[group_by] == x[group_by] and y["image"] != x["image"]]
        other = [y for y in items if y[group_by] != x[group_by] and row[index[y["image"]]] <= max_locality]
        if same:
            best = max(same, key=lambda y: row[index[y["image"]]])
            if row[index[best["image"]]] >= min_generality:
                x["image_rephrase"] = best["image"]
                x["image_rephrase_sim"] = round(float(row[index[best["image"]]]), 4)
        if other:
            near = max(other, key=lambda y: row[index[y["image"]]])
            x.setdefault("locality", []).append(_image_locality(near, float(row[index[near["image"]]])))
    return items


def _image_locality(other: Item, sim: float) -> dict[str, Any]:
    """Another item's question on its own image, with its options rendered, asked after the edit."""
    return {
        "question": render_options(other["question"], list(other["options"].values())),
        "answer": other["answer"],
        "image": other["image"],
        "from": other["id"],
        "sim": round(sim, 4),
    }


def _embed_images(ctx: Context, paths: Sequence[str], encoder: str) -> np.ndarray:
    """Unit image vectors (P, D), cached in ``.build`` by the encoder's weights and each file's bytes."""
    from mmke.embeddings import unit_rows

    cache = ctx.work / f"images-{_encoder_stamp(encoder)}.npz"
    keys = [hashlib.sha256((ctx.out / p).read_bytes()).hexdigest() for p in paths]
    known: dict[str, np.ndarray] = dict(np.load(cache)) if cache.exists() else {}
    todo = [(p, k) for p, k in zip(paths, keys, strict=True) if k not in known]
    if todo:
        vectors = _encode(ctx.out, [p for p, _ in todo], encoder)  # (T, D)
        known.update({k: v for (_, k), v in zip(todo, vectors, strict=True)})
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **known)
    return unit_rows(np.stack([known[k] for k in keys]))


def _encoder_stamp(encoder: str) -> str:
    """The encoder's name and its weight files' sizes and times: a retrained model misses the cache."""
    from mmke.models._loading import resolve_bundled

    folder = resolve_bundled(encoder) or Path(encoder)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    blob = json.dumps([encoder, [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _encode(root: Path, paths: Sequence[str], encoder: str) -> np.ndarray:
    from mmke.models import LVLM
    from mmke.models.features import pooled_image_features

    model = LVLM.load(encoder, images=ImageStore(root))
    out = [
        pooled_image_features(model, [ImageRef(p) for p in paths[i : i + 32]])
        for i in range(0, len(paths), 32)
    ]
    return np.concatenate([o.numpy() for o in out])  # (P, D)


# ---------------------------------------------------------------- knowledge-graph questions


@item_step("multihop")
def multihop_questions(
    ctx: Context,
    items: list[Item],
    kg: str,
    phrases: Mapping[str, str],
    base: str,
    per_hop: int = 1,
    max_hops: int = 4,
) -> list[Item]:
    """Portability: 1-``max_hops``-hop questions from the counterfactual answer along KG paths.

    ``phrases`` maps each relation to a noun phrase with ``{x}`` ("the treatment of {x}");
    ``base`` refers to the edited thing ("the finding in the image"). Paths whose answer differs
    from the old answer's come first; every answer is a walk in the KG.
    """
    _require(items, "counterfactual", "multihop", "counterfactual")
    graph = multihop.TripleGraph.read_tsv(ctx.input(kg))
    _check_phrases(graph, phrases)
    for x in items:
        new, old = x["counterfactual"], x["answer"]
        paths = multihop.portability_paths(graph, graph.paths_from(new, max_hops), new, old, per_hop)
        x["portability"] = [
            {"question": q, "answer": a, "hop": len(p), "path": ">".join(p)}
            for p, q, a in multihop.hop_questions(graph, paths, new, base, phrases)
        ]
    return items


def _check_phrases(graph: multihop.TripleGraph, phrases: Mapping[str, str]) -> None:
    missing = [r for r in graph.relations() if r not in phrases]
    bad = [r for r, p in phrases.items() if "{x}" not in str(p)]
    if missing or bad:
        raise ConfigError(f"phrases: relations without a phrase {missing}, phrases without '{{x}}' {bad}")


@item_step("text_locality")
def text_locality(
    ctx: Context,
    items: list[Item],
    kg: str,
    phrases: Mapping[str, str] | None = None,
    generator: Mapping[str, Any] | None = None,
    per_item: int = 2,
    retries: int = 2,
) -> list[Item]:
    """T-Locality: one-hop KG facts about entities the edit does not touch, asked by name.

    Questions are ``what is <phrase of the relation> ?`` with ``phrases``, or written by a text
    generator from (subject, relation, answer) with ``generator`` (a fact whose question fails
    is reported and left out).
    """
    if (phrases is None) == (generator is None):
        raise ConfigError("step 'text_locality': give either phrases or generator")
    graph = multihop.TripleGraph.read_tsv(ctx.input(kg))
    if phrases is not None:
        _check_phrases(graph, phrases)
    facts = list(dict.fromkeys((s, r) for s, r, _ in graph.triples if graph.walk(s, (r,)) is not None))
    chosen = {x["id"]: _locality_facts(ctx, graph, facts, x, per_item) for x in items}
    flat = [(rid, s, r, graph.walk(s, (r,)) or "") for rid, fs in chosen.items() for s, r in fs]
    if phrases is not None:
        questions: list[str | None] = [multihop.composed((r,), s, phrases) for _, s, r, _ in flat]
    else:
        asks = [("question", {"subject": s, "relation": r, "answer": a}) for _, s, r, a in flat]
        questions = _generate(ctx, "text_locality", asks, [f[0] for f in flat], generator, retries)
    by_id = {x["id"]: x for x in items}
    for (rid, _, _, answer), q in zip(flat, questions, strict=True):
        if q:
            by_id[rid].setdefault("locality", []).append({"question": q, "answer": answer})
    return items


def _locality_facts(
    ctx: Context, graph: multihop.TripleGraph, facts: list[tuple[str, str]], x: Item, n: int
) -> list[tuple[str, str]]:
    """``n`` facts (seeded per item) whose subject and answer are neither the old nor the new answer."""
    touched = {x["answer"], x.get("counterfactual")}
    pool = [f for f in facts if f[0] not in touched and graph.walk(f[0], (f[1],)) not in touched]
    if not pool:
        return []
    picks = rng_for(ctx.seed, "tloc", x["id"]).choice(len(pool), size=min(n, len(pool)), replace=False)
    return [pool[int(i)] for i in picks]


# ---------------------------------------------------------------- adversarial prompts


@item_step("adversarial")
def adversarial_prompts(
    ctx: Context,
    items: list[Item],
    context: str = "the patient was treated for {other} last year .",
    vague: str = "so what is going on in the image , roughly ?",
) -> list[Item]:
    """MedMKEB's five attacks on each edit question (with its options); the answer stays the counterfactual.

    ``context`` may use ``{other}`` (an option that is neither old nor new answer) and ``{answer}``.
    """
    _require(items, "counterfactual", "adversarial", "counterfactual")
    for x in items:
        opts = list(x["options"].values())
        others = [o for o in opts if o not in (x["answer"], x["counterfactual"])] or [x["answer"]]
        rng = rng_for(ctx.seed, "attack", x["id"])
        other = others[int(rng.integers(len(others)))]
        parts = adversarial.AttackParts(
            old=x["answer"],
            similar=others[0],
            context=context.format(other=other, answer=x["answer"]),
            vague=render_options(vague, opts),
        )
        question = render_options(x["question"], opts)
        x["adversarial"] = [
            {"type": kind.value, "prompt": prompt}
            for kind, prompt in adversarial.attacks(question, parts, int(rng.integers(1000)))
        ]
    return items


# ---------------------------------------------------------------- review


@item_step("review", cached=False)
def review_step(ctx: Context, items: list[Item]) -> list[Item]:
    """Write what was generated to ``OUT/review_items.jsonl`` for ``mmke review OUT``; apply saved decisions.

    A rejected counterfactual drops its item; a rejected rephrase, image pair, locality,
    portability or adversarial question drops that question; an edit replaces its text.
    Undecided items stay as generated, so an unreviewed build still completes.
    """
    from mmke.data.build import review

    generated = [r for x in items for r in _review_items(x)]
    review.write_items(ctx.out, generated)
    kept = {r.id: r for r in review.apply_decisions(generated, review.read_decisions(ctx.out))}
    return [y for x in items if (y := _reviewed(x, kept)) is not None]


def _review_items(x: Item) -> list[Any]:
    from mmke.data.build.review import ReviewItem

    rid, img = x["id"], (x["image"],)
    out = [ReviewItem(f"{rid}/counterfactual", "counterfactual", _cf_fields(x), img)]
    if "rephrase" in x:
        out.append(
            ReviewItem(f"{rid}/rephrase", "rephrase", {"rephrase": x["rephrase"], "of": x["question"]}, img)
        )
    if "image_rephrase" in x:
        pics = (x["image"], x["image_rephrase"])
        out.append(ReviewItem(f"{rid}/image_rephrase", "image_neighbours", {"answer": x["answer"]}, pics))
    for k, loc in enumerate(x.get("locality", [])):
        pics = (loc["image"],) if loc.get("image") else ()
        fields = {"question": loc["question"], "answer": loc["answer"]}
        out.append(ReviewItem(f"{rid}/locality/{k}", "locality", fields, pics))
    for k, port in enumerate(x.get("portability", [])):
        fields = {"question": port["question"], "answer": port["answer"], "hop": str(port["hop"])}
        out.append(ReviewItem(f"{rid}/portability/{k}", "multihop", fields, img))
    for att in x.get("adversarial", []):
        out.append(
            ReviewItem(f"{rid}/adversarial/{att['type']}", "adversarial", {"prompt": att["prompt"]}, img)
        )
    return out


def _cf_fields(x: Item) -> dict[str, str]:
    return {"question": x["question"], "answer": x["answer"], "counterfactual": x.get("counterfactual", "")}


def _reviewed(x: Item, kept: Mapping[str, Any]) -> Item | None:
    """``x`` after the decisions: None when its counterfactual was rejected."""
    rid = x["id"]
    cf = kept.get(f"{rid}/counterfactual")
    if cf is None:
        return None
    if cf.fields["counterfactual"] not in x["options"].values() or cf.fields["counterfactual"] == x["answer"]:
        raise BadRecordError(f"review of {rid}: the counterfactual must be another of its options")
    x["counterfactual"] = cf.fields["counterfactual"]
    if "rephrase" in x:
        r = kept.get(f"{rid}/rephrase")
        if r is None:
            del x["rephrase"]
        else:
            x["rephrase"] = r.fields["rephrase"]
    if "image_rephrase" in x and f"{rid}/image_rephrase" not in kept:
        del x["image_rephrase"]
    x["locality"] = _kept_list(x.get("locality", []), rid, "locality", kept, ("question", "answer"))
    x["portability"] = _kept_list(x.get("portability", []), rid, "portability", kept, ("question", "answer"))
    x["adversarial"] = [
        {**a, "prompt": kept[f"{rid}/adversarial/{a['type']}"].fields["prompt"]}
        for a in x.get("adversarial", [])
        if f"{rid}/adversarial/{a['type']}" in kept
    ]
    return x


def _kept_list(
    entries: list[dict[str, Any]], rid: str, part: str, kept: Mapping[str, Any], keys: Sequence[str]
) -> list[dict[str, Any]]:
    out = []
    for k, entry in enumerate(entries):
        r = kept.get(f"{rid}/{part}/{k}")
        if r is not None:
            out.append({**entry, **{key: r.fields[key] for key in keys}})
    return out


# ---------------------------------------------------------------- writing


_DRAFT_ONLY = ("image_rephrase_sim",)


@item_step("write", cached=False)
def write(ctx: Context, items: list[Item], train_share: float = 0.0) -> list[Item]:
    """``OUT/items.json`` (medmcq shape) and ``OUT/cases.jsonl`` (native; ``mmke run benchmark=native:...``).

    With ``train_share`` > 0 that share of items (chosen by the seed) goes to ``items_train.json``
    and ``cases_train.jsonl`` instead, for editors that train (SERAC, MEND, KE) and for IKE's demos.
    """
    from mmke.data.formats.medmcq import read_medmcq
    from mmke.embeddings import MiniLM

    records = [{k: v for k, v in x.items() if k not in _DRAFT_ONLY} for x in items]
    order = rng_for(ctx.seed, "split").permutation(len(records))
    n_train = round(train_share * len(records))
    splits = {
        "": [records[i] for i in sorted(order[n_train:])],
        "_train": [records[i] for i in sorted(order[:n_train])],
    }
    for suffix, recs in splits.items():
        if not recs:
            continue
        path = ctx.out / f"items{suffix}.json"
        path.write_text(
            json.dumps(recs, ensure_ascii=False, indent=1, sort_keys=True) + "\n", encoding="utf-8"
        )
        bench = read_medmcq(path, ctx.out, MiniLM(needed_by="build step 'write'"))
        header = {"benchmark": ctx.name, "seed": ctx.seed, "split": "train" if suffix else "eval"}
        write_cases(ctx.out / f"cases{suffix}.jsonl", bench.cases, header)
    return items
