"""Metrics as small pure functions: per-probe scores, per-case means, and the run summary.

Definitions follow DESIGN.md "Canonical definitions". ``scoring="vlkeb"`` is the VLKEB /
MMKE-Bench variant (reference/anchors_spec.md §2 (C)): targets are tokenised alone and scored at
the end of the sequence (``LVLM.score(..., scoring="vlkeb")``), and locality is the rank-wise
top-k match (text k=1, image k=10) over every logit position, not only the answer span. No torch
import here (tensors are only duck-typed), so ``mmke list`` stays cheap.
"""

from __future__ import annotations

import math
import re
import string
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

from mmke.registry import register_metric
from mmke.types import LOCALITY_KINDS, SCORINGS, AttackType, Probe, ProbeKind

if TYPE_CHECKING:
    import torch

    from mmke.models.scoring import ItemScore

SUMMARY_SCHEMA = "mmke-summary/1"
#: Papers' k for rank-wise locality: text top-1, image top-10 (anchors_spec §2, EasyEdit HEAD).
VLKEB_LOCALITY_K = {ProbeKind.TEXT_LOCALITY: 1, ProbeKind.IMAGE_LOCALITY: 10}
#: Keys of a run record's ``run`` block that identify a summary group (besides edit type).
GROUP_KEYS = ("model", "method", "protocol", "gap", "checkpoint")
EFFICIENCY_KEYS = ("edit_seconds", "score_seconds", "peak_memory_mb", "edited_params")
DECIMALS = 6

_BASE_METRICS = {
    "reliability": "Rel: edit prompt (+ image) -> new target, token accuracy",
    "text_reliability": "T-Rel: text-only question about the edited knowledge (MMKE-Bench)",
    "image_reliability": "I-Rel: question with the edit image about the edited knowledge (MMKE-Bench)",
    "text_generality": "T-Gen: rephrased prompt, same image -> new target",
    "image_generality": "I-Gen: another image of the subject, same prompt -> new target",
    "text_locality": "T-Loc: unrelated text fact; post-edit top-1 agrees with pre-edit top-1",
    "image_locality": "I-Loc: unrelated image question; post-edit top-1 agrees with pre-edit top-1",
    "portability": "Port: questions that follow from the edit (all hops)",
    "robustness": "Rob: edit prompt under an adversarial rewording (all attack types, MedMKEB)",
}
_HOPS = range(1, 5)

#: Every metric key a record may carry -> one line: paper name, then meaning.
METRICS: dict[str, str] = {
    **_BASE_METRICS,
    **{f"portability_hop{h}": f"Port-{h}: portability of {h}-hop questions" for h in _HOPS},
    **{f"robustness_{a.value}": f"Rob: robustness under {a.value.replace('_', ' ')}" for a in AttackType},
}


@dataclass(frozen=True)
class MetricSpec:
    """A metric key as registered: what it means and how it aggregates."""

    key: str
    help: str
    aggregate: str = "mean over the case's probes (token accuracy, exact match), then macro over cases"


def _register_all() -> None:
    for key, meaning in METRICS.items():
        register_metric(key, help=meaning)(MetricSpec(key, meaning))


_register_all()  # a plain module: the registry imports it and it registers on import


class _ProbeLike(Protocol):
    @property
    def kind(self) -> Any: ...
    @property
    def hop(self) -> int | None: ...
    @property
    def attack(self) -> Any: ...


@dataclass(frozen=True)
class ProbeResult:
    """One probe's scores, as stored in a case record's ``probes`` list (the contract's shape)."""

    kind: str
    hop: int | None
    attack: str | None
    token_accuracy: float
    exact_match: float
    nll: float
    agreement: float | None = None
    generated: str | None = None
    generated_match: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- per probe


def agreement(pre_argmax: torch.Tensor, post_argmax: torch.Tensor) -> float:
    """mmke locality: fraction of answer positions whose post-edit top-1 id equals the pre-edit one."""
    if tuple(pre_argmax.shape) != tuple(post_argmax.shape):
        raise ValueError(
            f"pre/post answer spans differ: {tuple(pre_argmax.shape)} vs {tuple(post_argmax.shape)}"
        )
    if pre_argmax.numel() == 0:
        raise ValueError("empty answer span: locality needs at least one answer token")
    return float((pre_argmax == post_argmax).float().mean().item())


def topk_rankwise(pre_topk: torch.Tensor, post_topk: torch.Tensor) -> float:
    """VLKEB/MMKE locality: element-wise (rank-order, not set) match of top-k ids, mean over positions x k."""
    # (n, k) each; the papers compare index lists position by position, so a swap of ranks 1 and 2 costs.
    return agreement(pre_topk, post_topk)


def trailing(pre: torch.Tensor, post: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last min(len(pre), len(post)) rows of each: sequences aligned at their ends."""
    n = min(pre.shape[0], post.shape[0])
    return pre[pre.shape[0] - n :], post[post.shape[0] - n :]


def _locality(kind: ProbeKind, post: ItemScore, pre: ItemScore, scoring: str) -> float:
    if scoring == "mmke":
        return agreement(pre.argmax_ids, post.argmax_ids)
    if pre.context_topk is None or post.context_topk is None:
        raise ValueError(
            "scoring='vlkeb' locality needs context_topk on the pre and post scores: "
            "score them with model.score(..., scoring='vlkeb')"
        )
    k = VLKEB_LOCALITY_K[kind]
    # Every logit position (image, prompt, answer). When pre and post differ in length (IKE puts
    # demonstrations before the post prompt) they are aligned on the trailing min length, as
    # EasyEdit HEAD's topk_token_match does: the shared tail ends at the same answer token.
    pre_top, post_top = trailing(pre.context_topk, post.context_topk)  # (n, k) each
    return topk_rankwise(pre_top[:, :k], post_top[:, :k])


def probe_result(
    probe: Probe,
    post: ItemScore,
    pre: ItemScore | None = None,
    scoring: str = "mmke",
    generated: str | None = None,
) -> ProbeResult:
    """Score one probe after the edit; locality kinds need ``pre`` (the unedited model's score)."""
    if scoring not in SCORINGS:
        raise ValueError(f"unknown scoring {scoring!r}; expected one of {', '.join(SCORINGS)}")
    kind = ProbeKind(probe.kind)
    attack = None if probe.attack is None else AttackType(probe.attack).value
    gen_match = None if generated is None else string_match(generated, probe.target)
    if kind in LOCALITY_KINDS:
        if pre is None:
            raise ValueError(f"{kind.value} probe needs the pre-edit score to measure agreement")
        agree = _locality(kind, post, pre, scoring)
        exact = 1.0 if agree == 1.0 else 0.0
        return ProbeResult(kind.value, probe.hop, attack, agree, exact, post.nll, agree, generated, gen_match)
    exact = 1.0 if post.exact_match else 0.0
    return ProbeResult(
        kind.value, probe.hop, attack, post.token_accuracy, exact, post.nll, None, generated, gen_match
    )


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse spaces (SQuAD-style normalisation)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def string_match(generated: str, target: str) -> float:
    """1.0 when the normalised greedy output is the target or starts with it as whole words."""
    # Greedy decoding often runs on past the answer ("paris. it is ..."), so a word-prefix counts.
    gen, tgt = normalize_answer(generated), normalize_answer(target)
    return 1.0 if gen == tgt or (tgt and gen.startswith(tgt + " ")) else 0.0


# ---------------------------------------------------------------- per case


def metric_key(probe: _ProbeLike) -> list[str]:
    """The record keys a probe contributes to: its kind, plus the per-hop / per-attack key."""
    kind = ProbeKind(probe.kind)
    if kind == ProbeKind.PORTABILITY and probe.hop is not None:
        return [kind.value, f"portability_hop{probe.hop}"]
    if kind == ProbeKind.ROBUSTNESS and probe.attack is not None:
        return [kind.value, f"robustness_{AttackType(probe.attack).value}"]
    return [kind.value]


def _mean(values: Iterable[float]) -> float:
    vals = list(values)
    # fsum is exactly rounded, hence independent of the order the values arrive in.
    return math.fsum(vals) / len(vals)


def case_metrics(results: Sequence[ProbeResult]) -> tuple[dict[str, float], dict[str, float]]:
    """Per-key means over one case's probes: (token accuracy, exact match); macro within the case."""
    acc: dict[str, list[float]] = defaultdict(list)
    exact: dict[str, list[float]] = defaultdict(list)
    for r in results:
        for key in metric_key(r):
            acc[key].append(r.token_accuracy)
            exact[key].append(r.exact_match)
    return {k: _mean(v) for k, v in sorted(acc.items())}, {k: _mean(v) for k, v in sorted(exact.items())}


def score_case(
    probes: Sequence[Probe],
    post: Sequence[ItemScore],
    pre: Sequence[ItemScore],
    scoring: str = "mmke",
    generated: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The metric part of a case record: ``metrics``, ``exact_match``, ``base`` and ``probes``."""
    gens: Sequence[str | None] = generated if generated is not None else [None] * len(probes)
    results = [
        probe_result(p, po, pr, scoring, g) for p, po, pr, g in zip(probes, post, pre, gens, strict=True)
    ]
    # base: the unedited model scored the same way (its locality agrees with itself, 1.0).
    base_results = [probe_result(p, pr, pr, scoring) for p, pr in zip(probes, pre, strict=True)]
    metrics, exact = case_metrics(results)
    return {
        "metrics": metrics,
        "exact_match": exact,
        "base": case_metrics(base_results)[0],
        "probes": [r.to_dict() for r in results],
    }


def behavioural_collapse(metrics: Mapping[str, float]) -> bool:
    """Whether a case's metrics say the edited model has collapsed (VLKEB's MEND after many edits).

    Finite weights can still give a model that answers nothing as before and nothing as edited:
    every locality probe disagrees with the unedited model at every answer token and every other
    probe misses every target token. A case without locality probes cannot show it.
    """
    keys = [k for k in _BASE_METRICS if k in metrics]
    has_locality = any(k in metrics for k in ("text_locality", "image_locality"))
    return has_locality and all(metrics[k] == 0.0 for k in keys)


# ---------------------------------------------------------------- run summary


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, DECIMALS)


def _macro(dicts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Mean of each key over the dicts that have it (a case without a key doesn't count for it)."""
    vals: dict[str, list[float]] = defaultdict(list)
    for d in dicts:
        for k, v in d.items():
            if v is not None:
                vals[k].append(float(v))
    return {k: _mean(v) for k, v in sorted(vals.items())}


def _rounded(values: Mapping[str, float]) -> dict[str, float]:
    return {k: round(v, DECIMALS) for k, v in values.items()}


def _relative_change(post: Mapping[str, float], base: Mapping[str, float]) -> dict[str, float | None]:
    """(post - base) / base per portability-hop key; None where the base is 0 (undefined)."""
    out: dict[str, float | None] = {}
    for key in sorted(k for k in post if k.startswith("portability_hop") and k in base):
        out[key] = _round((post[key] - base[key]) / base[key]) if base[key] else None
    return out


def _group(ident: dict[str, Any], records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    ok = [r for r in records if r.get("status", "ok") == "ok"]
    metrics = _macro(r.get("metrics") or {} for r in ok)
    base = _macro(r.get("base") or {} for r in ok)
    return {
        **ident,
        "n_cases": len(records),
        "n_collapsed": len(records) - len(ok),
        "n_error": sum(1 for r in records if r.get("status") == "error"),
        "metrics": _rounded(metrics),
        "exact_match": _rounded(_macro(r.get("exact_match") or {} for r in ok)),
        "base": _rounded(base),
        # from the unrounded means, so a tiny base is not rounded to 0 first
        "portability_relative_change": _relative_change(metrics, base),
        "efficiency": _rounded(_macro(r.get("efficiency") or {} for r in ok)),
    }


def _sort_key(ident: Mapping[str, Any]) -> tuple:
    # None sorts before any value; "all" before every edit type.
    parts = [(ident[k] is not None, ident[k] if ident[k] is not None else 0) for k in GROUP_KEYS]
    return (*parts, ident["edit_type"] != "all", ident["edit_type"])


def _common_run(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``run`` fields that every record shares (benchmark, seed, config hash …)."""
    runs = [r.get("run") or {} for r in records]
    if not runs:
        return {}
    keys = set.intersection(*(set(r) for r in runs)) - set(GROUP_KEYS)
    return {k: runs[0][k] for k in sorted(keys) if all(r[k] == runs[0][k] for r in runs)}


def summarize(records: Iterable[Mapping[str, Any]], run: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The run summary: per (model, method, protocol, gap, checkpoint) x edit type ("all" + each).

    Records are put in a fixed order first, so parallel workers' arrival order cannot change a sum.
    """
    recs = sorted(records, key=lambda r: (repr(sorted((r.get("run") or {}).items())), r["case_id"]))
    groups: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for r in recs:
        info = r.get("run") or {}
        ident = tuple(info.get(k) for k in GROUP_KEYS)
        groups[(*ident, "all")].append(r)
        groups[(*ident, str(r.get("edit_type")))].append(r)
    idents = [dict(zip((*GROUP_KEYS, "edit_type"), key, strict=True)) for key in groups]
    out = [_group(i, groups[tuple(i.values())]) for i in sorted(idents, key=_sort_key)]
    return {
        "schema": SUMMARY_SCHEMA,
        "run": dict(run) if run is not None else _common_run(recs),
        "groups": out,
    }
