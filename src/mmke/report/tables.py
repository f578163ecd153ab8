"""Paper-style result tables built from a run's ``RunSummary``, and their renderers.

Builders are pure functions ``RunSummary -> ReportTable`` (VLKEB Table 2, MMKE-Bench Tables 3-5,
VLKEB Fig. 3 as numbers, MedMKEB robustness, sequential gaps, efficiency); renderers turn a
``ReportTable`` into markdown, CSV, LaTeX (booktabs), JSON or a ``rich`` table. Column labels
and the order of metrics, hops and attacks are the metric declarations' (``metric_specs``).
"""

from __future__ import annotations

import csv
import difflib
import io
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from rich.markup import escape as escape_markup
from rich.table import Table

from mmke.errors import ConfigError, MmkeError
from mmke.eval import metrics as _metrics
from mmke.eval.metrics import MetricSpec, metric_specs
from mmke.eval.records import GroupSummary, Provenance, RunSummary
from mmke.types import ProbeKind

Cell = str | int | float | None

EDIT_TYPE_LABELS: Mapping[str, str] = MappingProxyType(
    {
        "visual_entity": "Visual Entity",
        "visual_semantic": "Visual Semantic",
        "user_specific": "User-Specific",
        "medical_mcq": "Medical MCQ",
        "all": "All",
    }
)

# The paper layouts below (MMKE-Bench Tables 3-5, VLKEB Fig. 4) are choices of columns, not
# declarations: they name registered metric keys only (tests/test_report.py checks it).
#: MMKE-Bench Tables 3-5 open with locality, then reliability, generality, portability; any other
#: headline metric follows in declaration order.
MMKE_ORDER = (
    "text_locality",
    "image_locality",
    "reliability",
    "text_reliability",
    "image_reliability",
    "text_generality",
    "image_generality",
    "portability",
    "robustness",
)
#: The MMKE-Bench paper's own columns (Tables 3-5), and its three edit types in its order.
MMKE_BENCH_ORDER = (
    "text_locality",
    "image_locality",
    "text_reliability",
    "image_reliability",
    "image_generality",
    "portability",
)
MMKE_BENCH_TYPES = ("visual_entity", "visual_semantic", "user_specific")
#: VLKEB Fig. 4 panels: the metrics plotted (and tabulated) against the sequential gap.
SEQUENTIAL_ORDER = (
    "reliability",
    "text_generality",
    "image_generality",
    "text_locality",
    "image_locality",
    "portability",
)
#: Further metrics a progression table shows when the run has them (CCKEB's continual table).
PROGRESSION_MORE = (
    "robustness",
    "textual_edit_reliability",
    "textual_edit_generality",
    "textual_edit_locality",
    "compositional",
)
#: MultiMedEdit's task types in its order (any other task follows, alphabetically).
TASK_FIRST = ("understanding", "reasoning")
#: MultiMedEdit's columns (reliability, generality, locality), in its order.
TASK_ORDER = ("reliability", "text_generality", "image_generality", "text_locality", "image_locality")
#: Breakdown tables of the newer benchmarks' metrics: name, parents, the section the paper
#: scores them on, and the title.
BREAKDOWNS = (
    (
        "comprehendedit",
        ("in_domain_generality", "in_domain_locality"),
        "exact_match",
        "KGI and KPI per neighbour list (exact match, %) — ComprehendEdit",
        "KGI: in-domain neighbours (the test set's nearest or farthest by image or question) answered "
        "with their own answer after the edit; KPI: originally right samples still answered as before.",
    ),
    (
        "mmqake",
        ("m_acc", "h_acc"),
        "generated",
        "Multi-hop and hop-wise accuracy by chain length (free generation, %) — MMQAKE",
        "M-Acc: some paraphrase's final answer right (aliases count); H-Acc: the same paraphrase's "
        "sub-questions right too. Chain length counts the edit as a hop (VLKEB's 1-hop ends a 2-hop chain).",
    ),
)
#: MMKU-Bench's measures of free generation beside mmke's first-answer match.
GENERATION_MEASURES = (
    ("generated", "match"),
    ("generated_vqa", "VQA-Acc"),
    ("generated_f1", "F1"),
)
EFFICIENCY_COLUMNS = (
    ("edit_seconds", "Edit s", "{:.3f}"),
    ("score_seconds", "Score s", "{:.3f}"),
    ("peak_memory_mb", "Peak MB", "{:,.1f}"),
    ("edited_params", "Edited params", "{:,.0f}"),
)
BASE_METHOD = "unedited"
PCT = "{:.1f}"
SIGNED_PCT = "{:+.1f}"


@dataclass(frozen=True)
class ReportTable:
    """A rendered-agnostic table: typed cells plus how to show them.

    ``formats`` holds one ``str.format`` pattern per column ("" for text). The first
    ``group_columns`` columns identify a group (a model, or model + edit type): display renderers
    blank repeated values there, and the best value of each ``best_columns`` column is marked
    per group, ignoring ``reference_rows`` (the unedited base).
    """

    name: str
    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    formats: tuple[str, ...]
    group_columns: int = 0
    best_columns: tuple[int, ...] = ()
    reference_rows: tuple[int, ...] = ()
    note: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- labels and lookups


def metric_spec(key: str) -> MetricSpec | None:
    """The declaration of metric ``key``; None for a key no metric declares (an older mmke's)."""
    return next((s for s in metric_specs() if s.key == key), None)


def metric_label(key: str) -> str:
    """Short column label of a metric key, e.g. ``portability_hop2`` -> ``Port-2``.

    A key no metric declares (one an older mmke wrote) is its own label.
    """
    spec = metric_spec(key)
    return key if spec is None else spec.label


def metric_name(key: str) -> str:
    """Full name of a metric key (a plot title), e.g. ``text_locality`` -> ``Text locality``."""
    spec = metric_spec(key)
    return key if spec is None else spec.name


def headline_keys() -> list[str]:
    """The headline metrics (no parent), in declaration order: VLKEB Table 2's columns."""
    return [s.key for s in metric_specs() if s.parent is None]


def _breakdown(parent: str, keys: Iterable[str]) -> list[str]:
    found = set(keys)
    return [s.key for s in metric_specs() if s.parent == parent and s.key in found]


def hop_keys(keys: Iterable[str]) -> list[str]:
    """The portability-per-hop keys among ``keys``, in declaration order (by hop)."""
    return _breakdown(ProbeKind.PORTABILITY.value, keys)


def attack_keys(keys: Iterable[str]) -> list[str]:
    """The robustness-per-attack keys among ``keys``, in declaration order (MedMKEB's)."""
    return _breakdown(ProbeKind.ROBUSTNESS.value, keys)


def declared_order(keys: Iterable[str]) -> list[str]:
    """``keys`` in declaration order, then those no metric declares (an older mmke's), sorted."""
    found = set(keys)
    declared = [s.key for s in metric_specs() if s.key in found]
    return declared + sorted(found - set(declared))


def edit_type_label(edit_type: str) -> str:
    return EDIT_TYPE_LABELS.get(edit_type, edit_type.replace("_", " ").title())


def select_groups(
    summary: RunSummary, protocol: str = "single", edit_type: str | None = "all", tasks: bool = False
) -> list[GroupSummary]:
    """Summary groups of one protocol (and edit type; None = every edit type); ``tasks``: the
    per-task groups instead of the per-edit-type ones."""
    return [
        g
        for g in summary.groups
        if g.protocol == protocol
        and (edit_type is None or g.edit_type == edit_type)
        and (g.task is not None) == tasks
    ]


def first_seen(groups: Iterable[GroupSummary], attr: str) -> list[str]:
    """Distinct values of ``attr`` in the order the runner wrote them (the order people chose)."""
    return list(dict.fromkeys(str(getattr(g, attr)) for g in groups))


def present_keys(groups: Sequence[GroupSummary], section: str, order: Sequence[str]) -> list[str]:
    """Keys of ``order`` that have a value in ``section`` of at least one group."""
    return [k for k in order if any(_value(g, section, k) is not None for g in groups)]


def _value(group: GroupSummary, section: str, key: str) -> float | None:
    value = group.section(section).get(key)
    return None if value is None else float(value)


def _pct(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def _base_by_model(groups: Sequence[GroupSummary]) -> dict[str, GroupSummary]:
    """One group per model whose ``base`` (the unedited model on the same cases) stands for the model."""
    base: dict[str, GroupSummary] = {}
    for g in groups:
        if g.base and str(g.model) not in base:
            base[str(g.model)] = g
    return base


def _ordered(groups: Sequence[GroupSummary], models: list[str], methods: list[str]) -> list[GroupSummary]:
    """Groups sorted by model then method, each in first-seen order."""
    rank = {m: i for i, m in enumerate(methods)}
    return sorted(groups, key=lambda g: (models.index(str(g.model)), rank.get(str(g.method), len(rank))))


# ---------------------------------------------------------------- builders


def main_table(summary: RunSummary, section: str = "metrics") -> ReportTable | None:
    """VLKEB Table 2: rows model x method (single editing, all edit types), plus the unedited base.

    ``section="exact_match"`` gives the exact-match variant (no base row: the contract stores the
    base as token accuracy only).
    """
    groups = select_groups(summary, "single", "all")
    keys = present_keys(groups, section, headline_keys())
    if not keys:
        return None
    models, methods = first_seen(groups, "model"), first_seen(summary.groups, "method")
    bases = _base_by_model(groups) if section == "metrics" else {}
    rows: list[tuple[Cell, ...]] = []
    reference: list[int] = []
    for model in models:
        if model in bases:
            reference.append(len(rows))
            values = [_pct(_value(bases[model], "base", k)) for k in keys]
            rows.append((model, BASE_METHOD, *values, bases[model].n_cases))
        for g in _ordered([g for g in groups if str(g.model) == model], models, methods):
            values = [_pct(_value(g, section, k)) for k in keys]
            rows.append((model, str(g.method), *values, g.n_cases))
    measure = "exact match" if section == "exact_match" else "token accuracy"
    return ReportTable(
        name="main_exact" if section == "exact_match" else "main",
        title=f"Single editing ({measure}, %) — VLKEB Table 2 layout",
        columns=("Model", "Method", *(metric_label(k) for k in keys), "N"),
        rows=tuple(rows),
        formats=("", "", *(PCT for _ in keys), "{:,}"),
        group_columns=1,
        best_columns=tuple(range(2, 2 + len(keys))),
        reference_rows=tuple(reference),
        note=_main_note(section, groups),
        meta={"keys": keys},
    )


def _main_note(section: str, groups: Sequence[GroupSummary]) -> str:
    locality = _rules(groups, lambda p: p.locality, "top-1 agreement over the answer span")
    if section == "exact_match":
        return (
            f"Exact match: all target tokens right. Locality ({locality}): agreement with the unedited model."
        )
    averaging = _rules(groups, lambda p: AVERAGING[p.averaging], AVERAGING["macro"])
    return (
        f"Token accuracy, {averaging}. Locality: {locality}, against the unedited model. "
        "Best edited value per model in bold; 'unedited' is the base model."
    )


#: How a group's values were averaged, in words (``Provenance.averaging``).
AVERAGING = {"macro": "macro mean over cases", "micro": "every compared token of every case pooled"}


def _rules(groups: Sequence[GroupSummary], rule_of: Callable[[Provenance], str], unrecorded: str) -> str:
    """One provenance rule of the groups in words: once when all share it, else per method."""
    rules: dict[str, list[str]] = {}
    for g in groups:
        rule = rule_of(g.provenance) if g.provenance is not None else unrecorded
        rules.setdefault(rule, []).append(str(g.method))
    if len(rules) == 1:
        return next(iter(rules))
    return "; ".join(f"{', '.join(dict.fromkeys(methods))}: {rule}" for rule, methods in rules.items())


#: The evaluations a teacher-forced vs generated table shows, each with its GroupSummary section.
EVALUATION_ROWS = (("teacher-forced", "metrics"), ("generated", "generated"), ("judged", "judged"))


def generation_table(summary: RunSummary) -> ReportTable | None:
    """VLKEB Table 2 layout, each method's metrics answered three ways (single editing, all edit
    types): teacher-forced token accuracy, free generation matching the target (for locality:
    the unedited model's answer), the judge's verdicts, and the gap generated − teacher-forced."""
    groups = select_groups(summary, "single", "all")
    if not any(g.generated for g in groups):
        return None
    keys = present_keys(groups, "generated", headline_keys())
    models, methods = first_seen(groups, "model"), first_seen(summary.groups, "method")
    bases = _base_by_model(groups)
    rows: list[tuple[Cell, ...]] = []
    for model in models:
        if model in bases and bases[model].base_generated:
            base = bases[model]
            for label, section in (("teacher-forced", "base"), ("generated", "base_generated")):
                rows.append((model, BASE_METHOD, label, *(_pct(_value(base, section, k)) for k in keys)))
        for g in _ordered([g for g in groups if str(g.model) == model], models, methods):
            shown = [(label, section) for label, section in EVALUATION_ROWS if g.section(section)]
            for label, section in shown:
                rows.append((model, str(g.method), label, *(_pct(_value(g, section, k)) for k in keys)))
            gap = [_gap(_value(g, "metrics", k), _value(g, "generated", k)) for k in keys]
            rows.append((model, str(g.method), "gap (gen − tf)", *gap))
    failed = sum(g.n_judge_failed or 0 for g in groups)
    note = (
        "Generated: greedy decoding with a fixed token budget, the first answer matched after "
        "normalisation (aliases count); locality: the edited model's answer equals the unedited one's. "
        "Gap in points."
    )
    if any(g.judged for g in groups):
        note += f" Judged: the judge's verdicts ({failed} probe(s) it could not grade are left out)."
    return ReportTable(
        name="teacher_vs_generated",
        title="Teacher-forced vs generated answers (single editing, %) — VLKEB Table 2 layout",
        columns=("Model", "Method", "Answered", *(metric_label(k) for k in keys)),
        rows=tuple(rows),
        formats=("", "", "", *(PCT for _ in keys)),
        group_columns=2,
        note=note,
    )


def _gap(tf: float | None, gen: float | None) -> float | None:
    return None if tf is None or gen is None else 100 * (gen - tf)


def edit_type_table(summary: RunSummary) -> ReportTable | None:
    """MMKE-Bench Tables 3-5 layout with every metric the run has: rows model x edit type x method,
    the 'All' block last (``mmke_bench_table`` is the paper's exact six columns)."""
    groups = select_groups(summary, "single", None)
    types = [t for t in first_seen(groups, "edit_type") if t != "all"]
    if not types:
        return None
    order = [*MMKE_ORDER, *(k for k in headline_keys() if k not in MMKE_ORDER)]
    keys = present_keys(groups, "metrics", order)
    ordered_types = [t for t in EDIT_TYPE_LABELS if t in types] + [
        t for t in types if t not in EDIT_TYPE_LABELS
    ]
    if any(g.edit_type == "all" for g in groups):
        ordered_types.append("all")
    rows = [(*_edit_type_cells(g, keys), g.n_cases) for g in by_edit_type(summary, groups, ordered_types)]
    return ReportTable(
        name="edit_types",
        title="Single editing by edit type (token accuracy, %) — MMKE-Bench Tables 3-5 layout",
        columns=("Model", "Edit type", "Method", *(metric_label(k) for k in keys), "N"),
        rows=tuple(rows),
        formats=("", "", "", *(PCT for _ in keys), "{:,}"),
        group_columns=2,
        best_columns=tuple(range(3, 3 + len(keys))),
        note="Best value per model and edit type in bold. 'All' is the macro mean over every case.",
    )


def mmke_bench_table(summary: RunSummary) -> ReportTable | None:
    """MMKE-Bench Tables 3-5 exactly: per model, edit type (entity, semantic, user) and method, the
    six columns T-Loc, I-Loc, T-Rel, I-Rel, I-Gen, Port ("–" where a run has no such probe)."""
    groups = select_groups(summary, "single", None)
    types = [t for t in MMKE_BENCH_TYPES if any(g.edit_type == t for g in groups)]
    if not types:
        return None
    rows = [_edit_type_cells(g, MMKE_BENCH_ORDER) for g in by_edit_type(summary, groups, types)]
    return ReportTable(
        name="mmke_bench",
        title="Single editing by edit type (token accuracy, %) — MMKE-Bench Tables 3-5",
        columns=("Model", "Edit type", "Method", *(metric_label(k) for k in MMKE_BENCH_ORDER)),
        rows=tuple(rows),
        formats=("", "", "", *(PCT for _ in MMKE_BENCH_ORDER)),
        group_columns=2,
        best_columns=tuple(range(3, 3 + len(MMKE_BENCH_ORDER))),
        note="Best value per model and edit type in bold. I-Gen: mean of a case's image-generality "
        "probes (for MMKE-Bench files: its Gen_M_Rel questions on image_rephrase).",
        meta={"keys": MMKE_BENCH_ORDER},
    )


def by_edit_type(
    summary: RunSummary, groups: Sequence[GroupSummary], edit_types: Sequence[str]
) -> list[GroupSummary]:
    """``groups`` of ``edit_types`` ordered model, then edit type (as given), then method (first seen)."""
    models, methods = first_seen(groups, "model"), first_seen(summary.groups, "method")
    out: list[GroupSummary] = []
    for model in models:
        for edit_type in edit_types:
            block = [g for g in groups if str(g.model) == model and g.edit_type == edit_type]
            out += _ordered(block, models, methods)
    return out


def _edit_type_cells(group: GroupSummary, keys: Sequence[str]) -> tuple[Cell, ...]:
    """Model, edit type label, method and the percentages of ``keys``."""
    values = (_pct(_value(group, "metrics", k)) for k in keys)
    return (str(group.model), edit_type_label(group.edit_type), str(group.method), *values)


def portability_table(summary: RunSummary) -> ReportTable | None:
    """VLKEB Fig. 3 as numbers: portability per hop and its relative change vs the unedited base."""
    groups = select_groups(summary, "single", "all")
    hops = hop_keys(k for g in groups for k in g.metrics)
    if not hops:
        return None
    models, methods = first_seen(groups, "model"), first_seen(summary.groups, "method")
    bases = _base_by_model(groups)
    rows: list[tuple[Cell, ...]] = []
    reference: list[int] = []
    for model in models:
        if model in bases:
            reference.append(len(rows))
            values = [_pct(_value(bases[model], "base", k)) for k in hops]
            rows.append((model, BASE_METHOD, *values, *(None for _ in hops)))
        for g in _ordered([g for g in groups if str(g.model) == model], models, methods):
            values = [_pct(_value(g, "metrics", k)) for k in hops]
            rows.append((model, str(g.method), *values, *(_pct(relative_change(g, k)) for k in hops)))
    labels = [metric_label(k) for k in hops]
    return ReportTable(
        name="portability_hops",
        title="Portability by hop (token accuracy, %) and relative change vs unedited (%) — VLKEB Fig. 3",
        columns=("Model", "Method", *labels, *(f"Δ{label}" for label in labels)),
        rows=tuple(rows),
        formats=("", "", *(PCT for _ in hops), *(SIGNED_PCT for _ in hops)),
        group_columns=1,
        best_columns=tuple(range(2, 2 + 2 * len(hops))),
        reference_rows=tuple(reference),
        note="Δ = (portability − base portability) / base portability; – where the base is 0.",
        meta={"keys": hops},
    )


def relative_change(group: GroupSummary, key: str) -> float | None:
    """(post - base) / base for portability hop ``key``, as the summary stored it.

    A summary written before the field existed has it empty: then it is computed the one way
    summaries compute it (``mmke.eval.metrics.relative_change``), from the rounded means.
    """
    stored = group.portability_relative_change or _metrics.relative_change(group.metrics, group.base)
    value = stored.get(key)
    return None if value is None else float(value)


def robustness_table(summary: RunSummary) -> ReportTable | None:
    """MedMKEB robustness: reliability next to robustness overall and per attack type."""
    groups = select_groups(summary, "single", "all")
    all_keys = {k for g in groups for k in g.metrics}
    attacks = attack_keys(all_keys)
    robustness = ProbeKind.ROBUSTNESS.value
    if not attacks and robustness not in all_keys:
        return None
    keys = present_keys(groups, "metrics", [ProbeKind.RELIABILITY.value, robustness, *attacks])
    models, methods = first_seen(groups, "model"), first_seen(summary.groups, "method")
    bases = _base_by_model(groups)
    rows: list[tuple[Cell, ...]] = []
    reference: list[int] = []
    for model in models:
        if model in bases:
            reference.append(len(rows))
            rows.append((model, BASE_METHOD, *(_pct(_value(bases[model], "base", k)) for k in keys)))
        for g in _ordered([g for g in groups if str(g.model) == model], models, methods):
            rows.append((model, str(g.method), *(_pct(_value(g, "metrics", k)) for k in keys)))
    return ReportTable(
        name="robustness",
        title="Robustness per attack type (token accuracy, %) — MedMKEB",
        columns=("Model", "Method", *(_within_parent(k, robustness) for k in keys)),
        rows=tuple(rows),
        formats=("", "", *(PCT for _ in keys)),
        group_columns=1,
        best_columns=tuple(range(2, 2 + len(keys))),
        reference_rows=tuple(reference),
        note="Robustness: the edit's target under prompt-injection rewrites of the edit prompt.",
    )


def _within_parent(key: str, parent: str) -> str:
    """A breakdown's label inside its parent's own table, without the parent's prefix ("Rob-")."""
    spec = metric_spec(key)
    if spec is None or spec.parent != parent:
        return metric_label(key)
    return spec.label.removeprefix(f"{metric_label(parent)}-")


#: Per stepped protocol: the record field that steps, its column label and the table's title.
STEPS = {
    "sequential": ("gap", "Gap", "Sequential editing by gap"),
    "lifelong": ("checkpoint", "Checkpoint", "Lifelong editing by checkpoint"),
    "batch": ("checkpoint", "Edits per update", "Batch editing by edits per update"),
}


def progression_table(summary: RunSummary, protocol: str = "sequential") -> ReportTable | None:
    """VLKEB Fig. 4 as numbers: metrics per method by sequential gap, lifelong checkpoint or batch size."""
    groups = select_groups(summary, protocol, "all")
    keys = present_keys(groups, "metrics", (*SEQUENTIAL_ORDER, *PROGRESSION_MORE))
    if not groups or not keys:
        return None
    step, label, title = STEPS[protocol]
    models, methods = first_seen(groups, "model"), first_seen(summary.groups, "method")
    ordered = sorted(_ordered(groups, models, methods), key=lambda g: _step_rank(g, step, models, methods))
    rows = tuple(
        (
            str(g.model),
            str(g.method),
            getattr(g, step),
            *(_pct(_value(g, "metrics", k)) for k in keys),
            g.n_cases,
            g.n_collapsed,
        )
        for g in ordered
    )
    return ReportTable(
        name=protocol,
        title=f"{title} (token accuracy, %)" + (" — VLKEB Fig. 4" if protocol == "sequential" else ""),
        columns=("Model", "Method", label, *(metric_label(k) for k in keys), "N", "Collapsed"),
        rows=rows,
        formats=("", "", "{:,}", *(PCT for _ in keys), "{:,}", "{:,}"),
        group_columns=2,
        note=_progression_note(protocol),
        meta={"keys": keys, "step": step},
    )


def _step_rank(group: GroupSummary, step: str, models: list[str], methods: list[str]) -> tuple:
    method = str(group.method)
    value = getattr(group, step)
    return (
        models.index(str(group.model)),
        methods.index(method) if method in methods else len(methods),
        value if value is not None else -1,
    )


def _progression_note(protocol: str) -> str:
    if protocol == "lifelong":
        return "All cases scored after the given number of edits in the stream."
    if protocol == "batch":
        return "Each batch written in one update, then every case of it scored; the last may be smaller."
    return "Gap g: case s-g is scored right after edit s, so larger gaps test older edits."


def task_table(summary: RunSummary) -> ReportTable | None:
    """MultiMedEdit's task split: per model, setting (single; lifelong after the whole stream), task
    type and method, reliability, generality and locality (and any other headline metric present)."""
    settings = []
    for protocol in ("single", "lifelong"):
        groups = select_groups(summary, protocol, "all", tasks=True)
        if protocol == "lifelong":  # the end of each method's stream
            last = {}
            for g in groups:
                key = (str(g.model), str(g.method))
                last[key] = max(last.get(key, 0), g.checkpoint or 0)
            groups = [g for g in groups if g.checkpoint == last[(str(g.model), str(g.method))]]
        settings.append((protocol, groups))
    every = [g for _, gs in settings for g in gs]
    if len({g.task for g in every}) < 2:
        return None
    order = [*TASK_ORDER, *(k for k in headline_keys() if k not in TASK_ORDER)]
    keys = present_keys(every, "metrics", order)
    models, methods = first_seen(every, "model"), first_seen(summary.groups, "method")
    tasks = sorted(
        {str(g.task) for g in every},
        key=lambda t: (t not in TASK_FIRST, TASK_FIRST.index(t) if t in TASK_FIRST else 0, t),
    )
    rows: list[tuple[Cell, ...]] = []
    for model in models:
        for protocol, groups in settings:
            for task in tasks:
                block = [g for g in groups if str(g.model) == model and g.task == task]
                for g in _ordered(block, models, methods):
                    setting = protocol if protocol == "single" else f"lifelong ({g.checkpoint:,} edits)"
                    values = (_pct(_value(g, "metrics", k)) for k in keys)
                    rows.append((model, setting, task, str(g.method), *values, g.n_cases, g.n_collapsed))
    return ReportTable(
        name="tasks",
        title="Editing by task type (token accuracy, %) — MultiMedEdit's understanding vs reasoning",
        columns=("Model", "Setting", "Task", "Method", *(metric_label(k) for k in keys), "N", "Collapsed"),
        rows=tuple(rows),
        formats=("", "", "", "", *(PCT for _ in keys), "{:,}", "{:,}"),
        group_columns=3,
        best_columns=tuple(range(4, 4 + len(keys))),
        note="Lifelong: every case of the task scored after the method's whole edit stream (a stream "
        "that collapsed ends at the checkpoint where it did). Best value per model, setting and task "
        "in bold.",
    )


def breakdown_table(summary: RunSummary, name: str) -> ReportTable | None:
    """One of ``BREAKDOWNS``: each parent metric and its breakdowns, per model x method (single)."""
    _, parents, section, title, note = next(b for b in BREAKDOWNS if b[0] == name)
    groups = select_groups(summary, "single", "all")
    order = [k for p in parents for k in (p, *_breakdown(p, (s.key for s in metric_specs())))]
    keys = present_keys(groups, section, order)
    if not any(p in keys for p in parents):
        return None
    models, methods = first_seen(groups, "model"), first_seen(summary.groups, "method")
    rows = tuple(
        (str(g.model), str(g.method), *(_pct(_value(g, section, k)) for k in keys))
        for g in _ordered(groups, models, methods)
    )
    return ReportTable(
        name=name,
        title=title,
        columns=("Model", "Method", *(metric_label(k) for k in keys)),
        rows=rows,
        formats=("", "", *(PCT for _ in keys)),
        group_columns=1,
        best_columns=tuple(range(2, 2 + len(keys))),
        note=note,
    )


def generation_measures_table(summary: RunSummary) -> ReportTable | None:
    """MMKU-Bench's scoring of free generation: per headline metric, mmke's first-answer match, VQA
    accuracy and token F1 over the whole output (single editing, all edit types)."""
    groups = select_groups(summary, "single", "all")
    keys = present_keys(groups, "generated_vqa", headline_keys())
    if not keys:
        return None
    models, methods = first_seen(groups, "model"), first_seen(summary.groups, "method")
    rows = tuple(
        (
            str(g.model),
            str(g.method),
            *(_pct(_value(g, section, k)) for k in keys for section, _ in GENERATION_MEASURES),
        )
        for g in _ordered(groups, models, methods)
    )
    columns = [f"{metric_label(k)} {label}" for k in keys for _, label in GENERATION_MEASURES]
    return ReportTable(
        name="generation_measures",
        title="Free generation scored three ways (single editing, %) — MMKU-Bench's VQA accuracy and F1",
        columns=("Model", "Method", *columns),
        rows=rows,
        formats=("", "", *(PCT for _ in columns)),
        group_columns=1,
        best_columns=tuple(range(2, 2 + len(columns))),
        note="match: the first answer is the target or an alias (mmke); VQA-Acc: the target appears as "
        "whole words anywhere in the output after VQAEval's normalisation; F1: SQuAD token F1 of the "
        "whole output. Locality probes have no reference answer here and are left out.",
    )


def efficiency_table(summary: RunSummary) -> ReportTable | None:
    """Mean edit and scoring seconds, peak memory and edited parameters per model x method."""
    groups = select_groups(summary, "single", "all") or [
        g for g in summary.groups if g.edit_type == "all" and g.task is None
    ]
    columns = [
        c for c in EFFICIENCY_COLUMNS if any(_value(g, "efficiency", c[0]) is not None for g in groups)
    ]
    if not columns:
        return None
    models, methods = first_seen(groups, "model"), first_seen(summary.groups, "method")
    seen: set[tuple[str, str]] = set()
    rows: list[tuple[Cell, ...]] = []
    for g in _ordered(groups, models, methods):
        key = (str(g.model), str(g.method))
        if key not in seen:  # one row per method even when several protocols ran
            seen.add(key)
            rows.append((*key, *(_value(g, "efficiency", c[0]) for c in columns)))
    return ReportTable(
        name="efficiency",
        title="Efficiency per edit (means over cases)",
        columns=("Model", "Method", *(c[1] for c in columns)),
        rows=tuple(rows),
        formats=("", "", *(c[2] for c in columns)),
        group_columns=1,
        note="Peak memory: RSS on CPU, torch.cuda.max_memory_allocated on GPU.",
    )


class IncomparableError(MmkeError):
    """Two results were computed by different definitions (their comparable groups differ)."""


def compare_table(
    a: RunSummary, b: RunSummary, label_a: str = "A", label_b: str = "B", *, mixed: bool = False
) -> ReportTable:
    """Two runs side by side: rows model x method (single, all), per metric A / B / Δ (points).

    A row whose A and B results belong to different comparable groups (another paper protocol,
    version or emulation; see ``Provenance``) is refused unless ``mixed``, and then marked.
    """
    ga, gb = select_groups(a, "single", "all"), select_groups(b, "single", "all")
    keys = present_keys([*ga, *gb], "metrics", headline_keys())
    index_a = {(str(g.model), str(g.method)): g for g in ga}
    index_b = {(str(g.model), str(g.method)): g for g in gb}
    differ = {
        key: (index_a[key].comparable_group, index_b[key].comparable_group)
        for key in index_a
        if key in index_b and index_a[key].comparable_group != index_b[key].comparable_group
    }
    if differ and not mixed:
        (model, method), (x, y) = next(iter(differ.items()))
        raise IncomparableError(
            f"{len(differ)} row(s) were scored by different definitions, e.g. {model} {method}: "
            f"{label_a} {x}, {label_b} {y}; pass --mixed to show them side by side, marked"
        )
    rows: list[tuple[Cell, ...]] = []
    for key in dict.fromkeys([*index_a, *index_b]):
        cells: list[Cell] = []
        for k in keys:
            va, vb = (_pct(_value(i[key], "metrics", k)) if key in i else None for i in (index_a, index_b))
            cells += [va, vb, None if va is None or vb is None else vb - va]
        method = f"{key[1]} (≠)" if key in differ else key[1]
        rows.append((key[0], method, *cells))
    columns = [f"{metric_label(k)} {s}" for k in keys for s in (label_a, label_b, "Δ")]
    note = f"Δ = {label_b} − {label_a}, in percentage points."
    if differ:
        marks = "; ".join(f"{m} {meth}: {x} vs {y}" for (m, meth), (x, y) in differ.items())
        note += f" (≠) not comparable, scored by different definitions: {marks}."
    return ReportTable(
        name="compare",
        title=f"{label_a} vs {label_b}: single editing (token accuracy, %)",
        columns=("Model", "Method", *columns),
        rows=tuple(rows),
        formats=("", "", *([PCT, PCT, SIGNED_PCT] * len(keys))),
        group_columns=1,
        note=note,
    )


def build_tables(summary: RunSummary) -> list[ReportTable]:
    """Every table the summary has data for, in reading order."""
    built = [
        main_table(summary),
        main_table(summary, "exact_match"),
        generation_table(summary),
        edit_type_table(summary),
        mmke_bench_table(summary),
        portability_table(summary),
        robustness_table(summary),
        breakdown_table(summary, "comprehendedit"),
        breakdown_table(summary, "mmqake"),
        generation_measures_table(summary),
        task_table(summary),
        progression_table(summary, "sequential"),
        progression_table(summary, "lifelong"),
        progression_table(summary, "batch"),
        efficiency_table(summary),
    ]
    return [t for t in built if t is not None]


def select_table(summary: RunSummary, name: str) -> ReportTable:
    """The table called ``name`` (a ``ReportTable.name``: main, edit_types, mmke_bench …).

    A one-line ``ConfigError`` with close matches when the run has no data for such a table.
    """
    tables = {t.name: t for t in build_tables(summary)}
    if name in tables:
        return tables[name]
    close = difflib.get_close_matches(name, tables, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    available = ", ".join(tables) or "none"
    raise ConfigError(f"no table {name!r} for this run{hint} (available: {available})")


# ---------------------------------------------------------------- cell display


def format_cell(value: Cell, fmt: str) -> str:
    """A cell as people read it: "–" for missing, the column's pattern for numbers."""
    if value is None:
        return "–"
    if fmt and isinstance(value, int | float):
        return fmt.format(value)
    return str(value)


def best_cells(table: ReportTable) -> set[tuple[int, int]]:
    """(row, column) of the highest value of each ranked column within each group (ties all win)."""
    best: set[tuple[int, int]] = set()
    groups: dict[tuple[Cell, ...], list[int]] = {}
    for i, row in enumerate(table.rows):
        if i not in table.reference_rows:
            groups.setdefault(row[: table.group_columns], []).append(i)
    for members in groups.values():
        if len(members) < 2:  # a lone method is not "best" of anything
            continue
        for col in table.best_columns:
            values = [(table.rows[i][col], i) for i in members if isinstance(table.rows[i][col], int | float)]
            if values:
                top = round(max(v for v, _ in values), 1)  # compare as shown: 1 decimal
                best.update((i, col) for v, i in values if round(v, 1) == top)
    return best


def display_rows(
    table: ReportTable, bold: tuple[str, str] | None = None, escape: Callable[[str], str] = str
) -> list[list[str]]:
    """Rows as strings: escaped for the target, repeated group values blanked, best cells in ``bold``."""
    marked = best_cells(table) if bold else set()
    out: list[list[str]] = []
    previous: tuple[Cell, ...] | None = None
    for i, row in enumerate(table.rows):
        cells = [escape(format_cell(v, f)) for v, f in zip(row, table.formats, strict=True)]
        for col in range(table.group_columns):
            if previous is not None and row[: col + 1] == previous[: col + 1]:
                cells[col] = ""
        for r, col in marked:
            if r == i and bold:
                cells[col] = f"{bold[0]}{cells[col]}{bold[1]}"
        out.append(cells)
        previous = row
    return out


# ---------------------------------------------------------------- renderers


def render_markdown(table: ReportTable, title: bool = True) -> str:
    """A GitHub-flavoured markdown table (numbers right-aligned), with title and note."""
    align = ["---:" if f else ":---" for f in table.formats]
    lines = [_md_row([_md_escape(c) for c in table.columns]), _md_row(align)]
    lines += [_md_row(cells) for cells in display_rows(table, bold=("**", "**"), escape=_md_escape)]
    parts = [f"### {table.title}", "", *lines] if title else lines
    if title and table.note:
        parts += ["", f"_{table.note}_"]
    return "\n".join(parts) + "\n"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _md_escape(text: str) -> str:
    """Keep names from breaking the table or turning into emphasis."""
    return text.replace("|", "\\|").replace("*", "\\*").replace("_", "\\_")


def render_csv(table: ReportTable) -> str:
    """Plain CSV for spreadsheets: every row complete, floats to 4 decimals, missing as empty."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(table.columns)
    for row in table.rows:
        writer.writerow(["" if v is None else round(v, 4) if isinstance(v, float) else v for v in row])
    return buffer.getvalue()


_LATEX_SPECIALS: Mapping[str, str] = MappingProxyType(
    {
        "\\": r"\textbackslash{}",
        "&": r"\&",
        "%": r"\%",
        "$": r"\$",
        "#": r"\#",
        "_": r"\_",
        "{": r"\{",
        "}": r"\}",
        "~": r"\textasciitilde{}",
        "^": r"\textasciicircum{}",
        "Δ": r"$\Delta$",
        "–": "--",
        "—": "---",
    }
)


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters (and map Δ / dashes) in plain text."""
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in text)


def render_latex(table: ReportTable) -> str:
    """A booktabs ``tabular`` (needs \\usepackage{booktabs}); a midrule between models."""
    spec = "".join("r" if f else "l" for f in table.formats)
    lines = [f"\\begin{{tabular}}{{{spec}}}", "\\toprule"]
    lines.append(" & ".join(latex_escape(c) for c in table.columns) + " \\\\")
    lines.append("\\midrule")
    for i, row in enumerate(display_rows(table, bold=("\\textbf{", "}"), escape=latex_escape)):
        if i and table.group_columns and row[0]:
            lines.append("\\midrule")
        lines.append(" & ".join(row) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


def render_json(tables: Sequence[ReportTable]) -> str:
    """All tables as JSON (name, title, columns, rows with raw numbers, note)."""
    payload = [
        {
            "name": t.name,
            "title": t.title,
            "columns": list(t.columns),
            "rows": [list(r) for r in t.rows],
            "note": t.note,
        }
        for t in tables
    ]
    return json.dumps(payload, indent=1, ensure_ascii=False) + "\n"


def rich_table(table: ReportTable) -> Table:
    """The table for a terminal (``Console.print``); best cells in bold."""
    out = Table(title=table.title, caption=table.note or None, title_justify="left")
    for name, fmt in zip(table.columns, table.formats, strict=True):
        out.add_column(escape_markup(name), justify="right" if fmt else "left")
    for i, cells in enumerate(display_rows(table, bold=("[bold]", "[/bold]"), escape=escape_markup)):
        out.add_row(*cells, style="dim" if i in table.reference_rows else None)
    return out
