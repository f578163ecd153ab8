"""Metrics declared once, as small pure functions: per probe, per case, and the run summary.

Each metric is a pure function over a case's probe results, registered with ``@metric`` beside
its paper name, short column label, the probe kinds it reads and its aggregation; tables, plots
and ``mmke list metrics`` read those declarations, so adding a metric touches this file only.
Definitions follow DESIGN.md "Canonical definitions". How a locality probe compares the edited
model with the unedited one is the scorer's (``mmke.models.scoring``: the canonical answer-span
agreement, or VLKEB / MMKE-Bench's rank-wise top-k over every position). No torch import here,
so ``mmke list`` stays cheap.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from mmke.eval.answers import answer_matches, same_answer, token_f1, vqa_accuracy
from mmke.eval.records import CaseRecord, GroupSummary, ProbeResult, RunBlock, RunInfo, RunSummary
from mmke.registry import metrics as _registry
from mmke.registry import register_metric
from mmke.types import LOCALITY_KINDS, AttackType, Probe, ProbeKind

if TYPE_CHECKING:
    from mmke.models.scoring import ItemScore, Scorer

#: How every metric here aggregates (DESIGN.md "Canonical definitions").
MACRO = "mean over the case's probes, then macro mean over cases"
DECIMALS = 6

#: A metric function: a case's probe results and a measure -> the case's value, or None when the
#: case has none of the probes the metric reads (the case then does not count for it).
MetricFn = Callable[[Sequence[ProbeResult], str], float | None]


@dataclass(frozen=True)
class MetricSpec:
    """A metric as declared once, beside its function: everything tables, plots and lists show.

    ``label`` is the paper's short name (a column header), ``name`` the full one (a plot title),
    ``paper`` the benchmark that defines it; ``parent`` is set for a breakdown of a headline metric
    (per hop, per attack type). Specs list in declaration order, which is VLKEB's column order.
    """

    key: str
    label: str
    name: str
    paper: str
    help: str
    reads: tuple[ProbeKind, ...]
    fn: MetricFn = field(compare=False, repr=False)
    aggregate: str = MACRO
    parent: str | None = None
    #: The same metric over many cases' probes pooled by their ``n_tokens`` (a micro average, as
    #: VLKEB's KE code computes); None: the metric is only ever macro-averaged.
    pooled: MetricFn | None = field(default=None, compare=False, repr=False)


def metric(
    key: str,
    *,
    label: str,
    name: str,
    paper: str,
    reads: Sequence[ProbeKind],
    help: str,
    aggregate: str = MACRO,
    parent: str | None = None,
    pooled: MetricFn | None = None,
) -> Callable[[MetricFn], MetricFn]:
    """Register the decorated pure function as metric ``key`` (see ``MetricSpec``)."""

    def add(fn: MetricFn) -> MetricFn:
        spec = MetricSpec(key, label, name, paper, help, tuple(reads), fn, aggregate, parent, pooled)
        register_metric(key, help=f"{label}: {help}")(spec)
        return fn

    return add


def metric_specs() -> list[MetricSpec]:
    """Every registered metric, in declaration order."""
    return [_registry.get(name) for name in _registry.declared()]


def probe_mean(
    results: Sequence[ProbeResult],
    measure: str,
    kind: ProbeKind,
    hop: int | None = None,
    attack: AttackType | None = None,
    pooled: bool = False,
    group: str | None = None,
) -> float | None:
    """The mean ``measure`` over the probes of ``kind`` (of one ``hop`` / ``attack`` / ``group`` when
    given); ``pooled``: each probe weighed by its ``n_tokens`` (when every probe has one)."""
    chosen = [
        r
        for r in results
        if r.kind == kind.value
        and (hop is None or r.hop == hop)
        and (attack is None or r.attack == attack.value)
        and (group is None or r.group == group)
    ]
    if not chosen:
        return None
    vals = [float(getattr(r, measure)) for r in chosen]
    weights = [r.n_tokens for r in chosen]
    if pooled and all(w is not None for w in weights):
        return math.fsum(v * w for v, w in zip(vals, weights, strict=True)) / math.fsum(weights)  # type: ignore[misc]
    return _mean(vals)


def _probe_metric(
    key: str,
    kind: ProbeKind,
    hop: int | None = None,
    attack: AttackType | None = None,
    group: str | None = None,
    **spec: Any,
) -> None:
    """Register a mean over probes (of one hop / attack type / group) with its token-pooled form."""
    where = {"kind": kind, "hop": hop, "attack": attack, "group": group}
    metric(key, reads=(kind,), pooled=partial(probe_mean, **where, pooled=True), **spec)(
        partial(probe_mean, **where)
    )


def _mean_of(kind: ProbeKind, label: str, name: str, paper: str, help: str) -> None:
    _probe_metric(kind.value, kind, label=label, name=name, paper=paper, help=help)


# The headline metrics, in VLKEB Table 2 / MedMKEB column order.
_mean_of(ProbeKind.RELIABILITY, "Rel", "Reliability", "VLKEB", "edit prompt (+ image) -> new target")
_mean_of(
    ProbeKind.TEXT_RELIABILITY,
    "T-Rel",
    "Text reliability",
    "MMKE-Bench",
    "text-only question about the edited knowledge",
)
_mean_of(
    ProbeKind.IMAGE_RELIABILITY,
    "I-Rel",
    "Image reliability",
    "MMKE-Bench",
    "question with the edit image about the edited knowledge",
)
_mean_of(
    ProbeKind.TEXT_GENERALITY,
    "T-Gen",
    "Text generality",
    "VLKEB",
    "rephrased prompt, same image -> new target",
)
_mean_of(
    ProbeKind.IMAGE_GENERALITY,
    "I-Gen",
    "Image generality",
    "VLKEB",
    "another image of the subject, same prompt -> new target",
)
_mean_of(
    ProbeKind.TEXT_LOCALITY,
    "T-Loc",
    "Text locality",
    "VLKEB",
    "unrelated text fact: the edited model still answers as the unedited one",
)
_mean_of(
    ProbeKind.IMAGE_LOCALITY,
    "I-Loc",
    "Image locality",
    "VLKEB",
    "unrelated image question: the edited model still answers as the unedited one",
)
_mean_of(
    ProbeKind.PORTABILITY, "Port", "Portability", "VLKEB", "questions that follow from the edit (all hops)"
)
_mean_of(
    ProbeKind.ROBUSTNESS,
    "Rob",
    "Robustness",
    "MedMKEB",
    "edit prompt under an adversarial rewording (all attack types)",
)
for _hop in range(1, 5):
    _probe_metric(
        f"portability_hop{_hop}",
        ProbeKind.PORTABILITY,
        hop=_hop,
        label=f"Port-{_hop}",
        name=f"Portability of {_hop}-hop questions",
        paper="VLKEB",
        help=f"portability of {_hop}-hop questions",
        parent="portability",
    )
for _attack, _short in {
    AttackType.PSEUDO_AUTHORITY: "Authority",
    AttackType.FEATURE_CONFUSION: "Confusion",
    AttackType.MISLEADING_CONTEXT: "Misleading",
    AttackType.IRRELEVANT_DETAILS: "Irrelevant",
    AttackType.VAGUE_WORDING: "Vague",
}.items():
    _words = _attack.value.replace("_", " ")
    _probe_metric(
        f"robustness_{_attack.value}",
        ProbeKind.ROBUSTNESS,
        attack=_attack,
        label=f"Rob-{_short}",
        name=f"Robustness under {_words}",
        paper="MedMKEB",
        help=f"robustness under {_words}",
        parent="robustness",
    )


# ComprehendEdit: KGI and KPI over the k nearest (or farthest) neighbours of each of its lists.
_mean_of(
    ProbeKind.IN_DOMAIN_GENERALITY,
    "KGI",
    "Knowledge generalization index",
    "ComprehendEdit",
    "in-domain neighbour samples answered with their own answer after the edit",
)
_mean_of(
    ProbeKind.IN_DOMAIN_LOCALITY,
    "KPI",
    "Knowledge preservation index",
    "ComprehendEdit",
    "in-domain samples the unedited model got right: the edited model still answers as it did",
)
#: ComprehendEdit's neighbour lists (its record keys) and how a column names them.
NEIGHBOUR_GROUPS = {
    "img_topk": ("img", "nearest by image"),
    "txt_topk": ("txt", "nearest by question"),
    "img_last_topk": ("img-far", "farthest by image"),
    "txt_last_topk": ("txt-far", "farthest by question"),
}
for _kind, _short in ((ProbeKind.IN_DOMAIN_GENERALITY, "KGI"), (ProbeKind.IN_DOMAIN_LOCALITY, "KPI")):
    for _group, (_col, _words) in NEIGHBOUR_GROUPS.items():
        _probe_metric(
            f"{_short.lower()}_{_group}",
            _kind,
            group=_group,
            label=f"{_short}-{_col}",
            name=f"{_short} on the neighbours {_words}",
            paper="ComprehendEdit",
            help=f"{_short} on the neighbours {_words}",
            parent=_kind.value,
        )

# CCKEB: the companion (textual) edit, and the question that needs both edits.
_mean_of(
    ProbeKind.TEXTUAL_EDIT_RELIABILITY,
    "Txt-Rel",
    "Textual edit reliability",
    "CCKEB",
    "the companion textual edit's question -> its new answer",
)
_mean_of(
    ProbeKind.TEXTUAL_EDIT_GENERALITY,
    "Txt-Gen",
    "Textual edit generality",
    "CCKEB",
    "the companion textual edit's rephrased question -> its new answer",
)
_mean_of(
    ProbeKind.TEXTUAL_EDIT_LOCALITY,
    "Txt-Loc",
    "Textual edit locality",
    "CCKEB",
    "an unrelated text fact beside the textual edit: answered as the unedited model did",
)
_mean_of(
    ProbeKind.COMPOSITIONAL,
    "CompRel",
    "Compositional reliability",
    "CCKEB",
    "a question on the edit image that needs the visual and the textual edit together",
)


def chain_accuracy(
    results: Sequence[ProbeResult], measure: str, *, steps: bool, hop: int | None = None
) -> float | None:
    """MMQAKE's M-Acc (``steps=False``) or H-Acc (``steps=True``) of one case, over its chains.

    A chain is the portability probes of one ``group`` (its final question, one per paraphrase
    ``variant``). M-Acc: the chain counts when some paraphrase's final answer is right; H-Acc: when
    some paraphrase has its final answer and every sub-question (``HOP_STEP`` probes of that group
    and variant) right. With a graded measure, "right" is the value, and the best paraphrase's
    weakest answer counts. Mean over the case's chains (of one ``hop`` when given).
    """
    finals = [
        r
        for r in results
        if r.kind == ProbeKind.PORTABILITY.value and r.group is not None and (hop is None or r.hop == hop)
    ]
    if not finals:
        return None
    parts: dict[tuple[str | None, int | None], list[float]] = defaultdict(list)
    if steps:
        for r in results:
            if r.kind == ProbeKind.HOP_STEP.value:
                parts[(r.group, r.variant)].append(float(getattr(r, measure)))
    chains: dict[str, float] = {}
    for r in finals:
        value = min([float(getattr(r, measure)), *parts.get((r.group, r.variant), [])])
        chains[str(r.group)] = max(chains.get(str(r.group), 0.0), value)
    return _mean(chains.values())


for _key, _label, _name, _steps in (
    ("m_acc", "M-Acc", "Multi-hop accuracy", False),
    ("h_acc", "H-Acc", "Hop-wise accuracy", True),
):
    _reads = (ProbeKind.PORTABILITY, ProbeKind.HOP_STEP) if _steps else (ProbeKind.PORTABILITY,)
    _what = "and every sub-question " if _steps else ""
    metric(
        _key,
        label=_label,
        name=_name,
        paper="MMQAKE",
        reads=_reads,
        help=f"multi-hop chains whose final answer {_what}is right under some paraphrase",
    )(partial(chain_accuracy, steps=_steps))
    for _hop in range(1, 5):
        # MMQAKE counts the edit as a hop: VLKEB's 1-hop question ends a 2-hop chain
        metric(
            f"{_key}_hop{_hop}",
            label=f"{_label}-{_hop + 1}",
            name=f"{_name} of {_hop + 1}-hop chains",
            paper="MMQAKE",
            reads=_reads,
            help=f"{_label} of {_hop + 1}-hop chains (portability hop {_hop})",
            parent=_key,
        )(partial(chain_accuracy, steps=_steps, hop=_hop))


# ---------------------------------------------------------------- per probe


def probe_result(
    probe: Probe,
    post: ItemScore,
    pre: ItemScore | None = None,
    scorer: Scorer | None = None,
    generated: str | None = None,
    in_context: bool = False,
    pre_generated: str | None = None,
    verdict: Judged | None = None,
) -> ProbeResult:
    """Score one probe after the edit; locality kinds need ``pre`` (the unedited model's score)
    and compare it with ``post`` as ``scorer`` does (default: mmke's canonical scorer), by its
    rule for edits that live in the prompt when ``in_context``.

    ``generated`` is the edited model's free answer: it matches the target (``answer_matches``)
    or, for locality, the unedited model's answer ``pre_generated`` (``same_answer``).
    ``verdict`` is the judge's grading of it.
    """
    kind = ProbeKind(probe.kind)
    attack = None if probe.attack is None else AttackType(probe.attack).value
    local = kind in LOCALITY_KINDS
    gen_match = vqa = f1 = None
    if generated is not None and local and pre_generated is not None:
        gen_match = same_answer(pre_generated, generated)
    elif generated is not None and not local:
        gen_match = answer_matches(generated, probe.target, probe.aliases, probe.options)
        vqa = vqa_accuracy(generated, probe.target, probe.aliases)
        f1 = token_f1(generated, probe.target, probe.aliases)
    judged = (
        {}
        if verdict is None
        else {"judge_verdict": verdict.verdict, "judge_reply": verdict.reply, "judge_error": verdict.error}
    )
    gen = {
        "generated": generated,
        "generated_match": gen_match,
        "generated_vqa": vqa,
        "generated_f1": f1,
        "group": probe.group,
        "variant": probe.variant,
        **judged,
    }
    if local:
        if pre is None:
            raise ValueError(f"{kind.value} probe needs the pre-edit score to measure agreement")
        if scorer is None:
            from mmke.models.scoring import CANONICAL as scorer
        agree, compared = scorer.locality(kind.value, post, pre, in_context)
        exact = 1.0 if agree == 1.0 else 0.0
        return ProbeResult(
            kind.value,
            probe.hop,
            attack,
            agree,
            exact,
            post.nll,
            agree,
            **gen,
            n_tokens=compared,
            pre_generated=pre_generated if generated is not None else None,
        )
    exact = 1.0 if post.exact_match else 0.0
    return ProbeResult(
        kind.value,
        probe.hop,
        attack,
        post.token_accuracy,
        exact,
        post.nll,
        None,
        **gen,
        n_tokens=post.n_tokens,
    )


class Judged(Protocol):
    """A judge's grading of one generated answer (``mmke.eval.judge.Verdict``)."""

    @property
    def verdict(self) -> str | None: ...
    @property
    def reply(self) -> str | None: ...
    @property
    def error(self) -> str | None: ...


# ---------------------------------------------------------------- per case


def _mean(values: Iterable[float]) -> float:
    vals = list(values)
    # fsum is exactly rounded, hence independent of the order the values arrive in.
    return math.fsum(vals) / len(vals)


def case_values(results: Sequence[ProbeResult], measure: str = "token_accuracy") -> dict[str, float]:
    """Every registered metric's value for one case (only those whose probes the case has).

    A metric sees only the probes that have ``measure`` (e.g. "judge_score": those the judge graded).
    """
    answered = [r for r in results if getattr(r, measure) is not None]
    out = {}
    for spec in metric_specs():
        value = spec.fn(answered, measure)
        if value is not None:
            out[spec.key] = value
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class CaseScores:
    """The metric part of a case record: token-accuracy and exact-match means, the unedited
    model's token accuracy on the same probes, each probe's result, and (when the run generates
    or judges) the generation-match and verdict means and the unedited model's generation match."""

    metrics: dict[str, float]
    exact_match: dict[str, float]
    base: dict[str, float]
    probes: tuple[ProbeResult, ...]
    generated: dict[str, float] = field(default_factory=dict)
    judged: dict[str, float] = field(default_factory=dict)
    base_generated: dict[str, float] = field(default_factory=dict)
    generated_vqa: dict[str, float] = field(default_factory=dict)
    generated_f1: dict[str, float] = field(default_factory=dict)


def score_case(
    probes: Sequence[Probe],
    post: Sequence[ItemScore],
    pre: Sequence[ItemScore],
    scorer: Scorer | None = None,
    generated: Sequence[str] | None = None,
    in_context: bool = False,
    pre_generated: Sequence[str] | None = None,
    verdicts: Sequence[Judged] | None = None,
) -> CaseScores:
    """Score a case's probes after the edit (``post``, and its free answers ``generated``) against
    the unedited model (``pre``, ``pre_generated``); ``verdicts`` are the judge's, per probe."""
    n = len(probes)
    gens: Sequence[str | None] = generated if generated is not None else [None] * n
    pre_gens: Sequence[str | None] = pre_generated if pre_generated is not None else [None] * n
    judged: Sequence[Judged | None] = verdicts if verdicts is not None else [None] * n
    results = tuple(
        probe_result(p, po, pr, scorer, g, in_context, pg, v)
        for p, po, pr, g, pg, v in zip(probes, post, pre, gens, pre_gens, judged, strict=True)
    )
    # base: the unedited model scored the same way (its locality agrees with itself, 1.0).
    base_results = [
        probe_result(p, pr, pr, scorer, pg, pre_generated=pg)
        for p, pr, pg in zip(probes, pre, pre_gens, strict=True)
    ]
    return CaseScores(
        case_values(results),
        case_values(results, "exact_match"),
        case_values(base_results),
        results,
        case_values(results, "generated_match"),
        case_values(results, "judge_score"),
        case_values(base_results, "generated_match"),
        case_values(results, "generated_vqa"),
        case_values(results, "generated_f1"),
    )


def behavioural_collapse(metrics: Mapping[str, float]) -> bool:
    """Whether a case's metrics say the edited model has collapsed (VLKEB's MEND after many edits).

    Finite weights can still give a model that answers nothing as before and nothing as edited:
    every locality probe disagrees with the unedited model at every answer token and every other
    headline metric misses every target token. A case without locality probes cannot show it.
    """
    keys = [s.key for s in metric_specs() if s.parent is None and s.key in metrics]
    has_locality = any(k in metrics for k in (ProbeKind.TEXT_LOCALITY.value, ProbeKind.IMAGE_LOCALITY.value))
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


def relative_change(post: Mapping[str, float], base: Mapping[str, float]) -> dict[str, float | None]:
    """(post - base) / base per portability-hop key; None where the base is 0 (undefined)."""
    hops = {s.key for s in metric_specs() if s.parent == ProbeKind.PORTABILITY.value}
    out: dict[str, float | None] = {}
    for key in sorted(k for k in post if k in hops and k in base):
        out[key] = _round((post[key] - base[key]) / base[key]) if base[key] else None
    return out


def _pooled(records: Sequence[CaseRecord]) -> dict[str, float]:
    """Token-pooled means over the records' probes (VLKEB's KE: ``pl.metrics.Accuracy`` counts
    every compared id of every case); a metric without a pooled form keeps its macro mean."""
    out = _macro(r.metrics for r in records)
    probes = [p for r in records for p in r.probes]
    for spec in metric_specs():
        if spec.pooled is not None and spec.key in out:
            value = spec.pooled(probes, "token_accuracy")
            if value is not None:
                out[spec.key] = value
    return out


def _group(ident: dict[str, Any], records: Sequence[CaseRecord]) -> GroupSummary:
    ok = [r for r in records if r.ok]
    provenance = _shared(r.run.provenance for r in records)
    micro = provenance is not None and provenance.averaging == "micro"
    metrics = _pooled(ok) if micro else _macro(r.metrics for r in ok)
    base = _macro(r.base for r in ok)
    return GroupSummary(
        **ident,
        n_cases=len(records),
        n_collapsed=len(records) - len(ok),
        n_error=sum(1 for r in records if r.status == "error"),
        metrics=_rounded(metrics),
        exact_match=_rounded(_macro(r.exact_match for r in ok)),
        base=_rounded(base),
        # from the unrounded means, so a tiny base is not rounded to 0 first
        portability_relative_change=relative_change(metrics, base),
        efficiency=_rounded(_macro(r.efficiency for r in ok)),
        provenance=provenance,
        generated=_rounded(_macro(r.generated for r in ok)),
        judged=_rounded(_macro(r.judged for r in ok)),
        base_generated=_rounded(_macro(r.base_generated for r in ok)),
        n_judge_failed=_judge_failures(ok),
        generated_vqa=_rounded(_macro(r.generated_vqa for r in ok)),
        generated_f1=_rounded(_macro(r.generated_f1 for r in ok)),
    )


def _judge_failures(records: Sequence[CaseRecord]) -> int | None:
    """Probes the judge could not grade (None when nothing was judged)."""
    probes = [
        p for r in records for p in r.probes if p.judge_verdict is not None or p.judge_error is not None
    ]
    return sum(1 for p in probes if p.judge_error is not None) if probes else None


def _shared(values: Iterable[Any]) -> Any:
    """The one value all give, or None when they differ (or there are none)."""
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else None


def _sort_key(ident: Mapping[str, Any]) -> tuple:
    # None sorts before any value; "all" before every edit type, then the task groups.
    parts = [(ident[k] is not None, ident[k] if ident[k] is not None else 0) for k in RunBlock.GROUP_KEYS]
    return (*parts, ident["edit_type"] != "all", ident["edit_type"], ident["task"] or "")


def _common_run(records: Sequence[CaseRecord]) -> RunInfo:
    """What every record's ``run`` block shares besides its group (benchmark, seed, config hash …)."""
    if not records:
        return RunInfo()
    runs = [r.run.__dict__ for r in records]
    keys = set(runs[0]) - {*RunBlock.GROUP_KEYS, "provenance"}  # provenance: per group
    return RunInfo(common={k: runs[0][k] for k in sorted(keys) if all(r[k] == runs[0][k] for r in runs)})


def summarize(records: Iterable[CaseRecord], run: RunInfo | None = None) -> RunSummary:
    """The run summary: per (model, method, protocol, gap, checkpoint) x edit type ("all" + each),
    and x task type for records that have one.

    Records are put in a fixed order first, so parallel workers' arrival order cannot change a sum.
    """
    recs = sorted(records, key=lambda r: (repr(sorted(r.run.__dict__.items())), r.case_id))
    groups: dict[tuple, list[CaseRecord]] = defaultdict(list)
    for r in recs:
        groups[(*r.run.group, "all", None)].append(r)
        groups[(*r.run.group, r.edit_type, None)].append(r)
        if r.task is not None:
            groups[(*r.run.group, "all", r.task)].append(r)
    idents = [dict(zip((*RunBlock.GROUP_KEYS, "edit_type", "task"), key, strict=True)) for key in groups]
    out = tuple(_group(i, groups[tuple(i.values())]) for i in sorted(idents, key=_sort_key))
    return RunSummary(run if run is not None else _common_run(recs), out)
