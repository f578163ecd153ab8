"""Building a world directory (files, images, cases, corpus, checks) and reading its stats back."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import mmke.data.world._templates as T
from mmke.data.schema import dumps_line, write_samples
from mmke.data.world._corpus import build_checks, build_corpus
from mmke.data.world._kg import RELATIONS, KnowledgeGraph
from mmke.data.world._medical import FINDINGS, Finding
from mmke.data.world._plan import World
from mmke.data.world._users import UserItem
from mmke.errors import BadRecordError
from mmke.types import EditCase, Sample

FORMAT = "mmke-world"
VERSION = 1
_OWNED = (
    "world.json",
    "cases_eval.jsonl",
    "cases_train.jsonl",
    "corpus_train.jsonl",
    "vocab.txt",
    "images",
    "checks",
)


def write_corpus(world: World, cases: dict[str, list[EditCase]], out: Path) -> None:
    """The corpus, the pre-edit checks, ``world.json`` and ``vocab.txt`` (after the cases)."""
    header = {"benchmark": "world", "seed": world.seed}
    corpus = build_corpus(world, cases["eval"])
    write_samples(out / "corpus_train.jsonl", corpus, {**header, "split": "corpus"})
    checks = build_checks(world)
    (out / "checks").mkdir()
    for name, samples in checks.items():
        write_samples(out / "checks" / f"{name}.jsonl", samples, {**header, "split": f"check/{name}"})
    (out / "world.json").write_text(dumps_line(_world_json(world)) + "\n", encoding="utf-8")
    texts = [*corpus, *(s for ss in checks.values() for s in ss)]
    (out / "vocab.txt").write_text(
        "\n".join(_vocab(texts, cases["eval"] + cases["train"])) + "\n", encoding="utf-8"
    )


def clear_owned(out: Path) -> None:
    """Remove what a previous world build wrote in ``out`` (other files stay)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in _OWNED:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _world_json(world: World) -> dict[str, Any]:
    """world.json: meta, the KG, question templates, paths, views, the medical slice, users, splits."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "seed": world.seed,
        "config": world.config.to_json(),
        **world.kg.to_json(),
        "relations": {r.name: _relation_json(r.name, r.domain, r.range) for r in RELATIONS},
        "templates": {
            "held_out_index": T.HELD_OUT,
            "recognition": list(T.RECOGNITION),
            "mcq": list(T.MCQ),
            "user": [T.USER_EDIT, T.USER_TEXT, T.USER_IMAGE],
        },
        "paths": {kind: [list(p) for p in ps] for kind, ps in world.paths.items()},
        "views": {
            "train": list(world.train_views),
            "held_out": list(world.held_out_views),
            "scan_train": list(world.train_scans),
            "scan_held_out": list(world.held_out_scans),
        },
        "medical": {
            "findings": [
                {"name": f.name, **dict(zip(_FINDING_ATTRS, f.attrs(), strict=True))}
                for f in world_findings(world)
            ],
            "combos": [c.id for c in world.combos],
        },
        "user_items": [_user_json(u) for u in world.users],
        "splits": {
            split: {et.value: list(s) for et, s in subjects.items()}
            for split, subjects in (("eval", world.eval_subjects), ("train", world.train_subjects))
        },
        "locality_facts": [list(f) for f in T.locality_facts()],
    }


_FINDING_ATTRS = ("shape", "intensity", "size", "margin")


def world_findings(world: World) -> tuple[Finding, ...]:
    return FINDINGS[: world.config.findings]


def _relation_json(name: str, domain: str, range_: str) -> dict[str, Any]:
    templates = list(T.relation_templates(name))
    return {"domain": domain, "range": range_, "templates": templates, "phrase": T.RELATION_TEXT[name][2]}


def _user_json(u: UserItem) -> dict[str, Any]:
    return {
        "id": u.id,
        "owner": u.owner,
        "kind": u.kind,
        "name": u.name,
        "phrase": u.phrase,
        "visual": u.spec,
    }


def _vocab(samples: list[Sample], cases: list[EditCase]) -> list[str]:
    """Every whitespace token in the world's text (corpus, checks and cases), sorted."""
    words: set[str] = set()
    for s in samples:
        words.update(s.prompt.split() + s.target.split())
    for c in cases:
        facts = [c.edit, *(p.onehop_edit for p in c.probes if p.onehop_edit)]
        for f in facts:
            words.update(f.prompt.split() + f.target.split() + (f.ground_truth or "").split())
        for p in c.probes:
            words.update(p.prompt.split() + p.target.split())
    return sorted(words)


def load_kg(out: Path) -> KnowledgeGraph:
    """The knowledge graph of a built world (entities, triples, visual specs, similar map)."""
    return KnowledgeGraph.from_json(_read_world_json(Path(out)))


def _read_world_json(out: Path) -> dict[str, Any]:
    path = out / "world.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise BadRecordError(f"{path}: cannot read the world ({e}); build it with build_world()") from None
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise BadRecordError(f"{path}: not an {FORMAT} v{VERSION} file; rebuild it with build_world()")
    return data


def world_stats(out: Path) -> dict[str, Any]:
    """Counts of a built world: entities, relations, cases, probes, hops, attacks, images, corpus, bytes."""
    out = Path(out)
    data = _read_world_json(out)
    stats: dict[str, Any] = {
        "seed": data["seed"],
        "entities": dict(sorted(Counter(e["type"] for e in data["entities"]).items())),
        "relations": dict(sorted(Counter(t[1] for t in data["triples"]).items())),
    }
    stats["n_entities"], stats["n_types"] = len(data["entities"]), len(stats["entities"])
    stats["n_relation_types"] = len(stats["relations"])
    for split in ("eval", "train"):
        stats[split] = _case_stats(out / f"cases_{split}.jsonl")
    images = [p for p in (out / "images").rglob("*.png")]
    stats["images"] = len(images)
    stats["corpus"] = {"corpus_train": _count_lines(out / "corpus_train.jsonl")}
    stats["corpus"].update(
        {f"checks/{p.stem}": _count_lines(p) for p in sorted((out / "checks").glob("*.jsonl"))}
    )
    stats["vocab"] = _count_lines(out / "vocab.txt") + 1
    stats["bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return stats


def _count_lines(path: Path) -> int:
    """Records in a JSONL file with a header line (or lines in a text file, minus one)."""
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f) - 1


def _case_stats(path: Path) -> dict[str, Any]:
    cases, kinds, hops, attacks = Counter(), Counter(), Counter(), Counter()
    with open(path, encoding="utf-8") as f:
        next(f)
        for line in f:
            rec = json.loads(line)
            cases[rec["edit_type"]] += 1
            for p in rec["probes"]:
                kinds[p["kind"]] += 1
                if "hop" in p:
                    hops[str(p["hop"])] += 1
                if "attack" in p:
                    attacks[p["attack"]] += 1
    return {
        "cases": dict(sorted(cases.items())),
        "n_cases": sum(cases.values()),
        "probes": dict(sorted(kinds.items())),
        "portability_hops": dict(sorted(hops.items())),
        "robustness_attacks": dict(sorted(attacks.items())),
    }
