"""Figures of a run (matplotlib ``Figure`` objects, Agg canvas, no pyplot state): portability by hop
(VLKEB Fig. 3), metrics by sequential gap (VLKEB Fig. 4), edit latency and peak memory, and the
gap between free generation and teacher forcing.

Every function takes a ``RunSummary`` and an output folder, and returns the PNG path, or None when
the summary has no data for that figure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmke.eval.records import GroupSummary, RunSummary
from mmke.report.tables import (
    BASE_METHOD,
    SEQUENTIAL_ORDER,
    first_seen,
    headline_keys,
    hop_keys,
    metric_label,
    metric_name,
    metric_spec,
    present_keys,
    relative_change,
    select_groups,
)
from mmke.types import LOCALITY_KINDS

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 110
LINE_STYLES = ("-", "--", ":", "-.")


def _figure(width: float, height: float) -> Figure:
    """A figure that renders through Agg without touching pyplot's global state."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _colours(labels: Sequence[str]) -> dict[str, Any]:
    """One fixed colour per method so every figure agrees (tab10, then tab20 past ten)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def _percent_axis(ax: Axes, top: float | None = 100.0) -> None:
    from matplotlib.ticker import PercentFormatter

    ax.yaxis.set_major_formatter(PercentFormatter(xmax=100, decimals=0))
    if top is not None:
        ax.set_ylim(0, top * 1.05)
    ax.grid(axis="y", alpha=0.3)


def _pct(values: Mapping[str, float], key: str) -> float:
    """A fraction as a percentage, NaN when missing (matplotlib leaves a gap)."""
    value = values.get(key)
    return math.nan if value is None else 100 * float(value)


def _series_label(group: GroupSummary, several_models: bool) -> str:
    method = str(group.method)
    return f"{group.model} / {method}" if several_models else method


def _is_locality(key: str) -> bool:
    """Whether a metric reads locality probes (its axis is agreement, not accuracy)."""
    spec = metric_spec(key)
    return spec is not None and bool(LOCALITY_KINDS.intersection(spec.reads))


# ---------------------------------------------------------------- portability by hop


def plot_portability(summary: RunSummary, out_dir: Path) -> Path | None:
    """Per model: portability per hop (bars per method, base as a line) and relative change vs base."""
    groups = select_groups(summary, "single", "all")
    hops = hop_keys(k for g in groups for k in g.metrics)
    if not hops:
        return None
    models = first_seen(groups, "model")
    colours = _colours(first_seen(summary.groups, "method"))
    fig = _figure(12, 4.2 * len(models))
    axes = fig.subplots(len(models), 2, squeeze=False)
    for row, model in enumerate(models):
        block = [g for g in groups if str(g.model) == model]
        _portability_bars(axes[row][0], block, hops, colours)
        _relative_bars(axes[row][1], block, hops, colours)
        axes[row][0].set_title(f"{model}: portability by hop")
        axes[row][1].set_title(f"{model}: relative change vs unedited (VLKEB Fig. 3)")
    return _save(fig, out_dir / "portability_hops.png")


def _bar_offsets(n: int, width: float = 0.8) -> tuple[list[float], float]:
    step = width / max(n, 1)
    return [(i - (n - 1) / 2) * step for i in range(n)], step


def _portability_bars(ax: Axes, block: list[GroupSummary], hops: list[str], colours: dict[str, Any]) -> None:
    offsets, width = _bar_offsets(len(block))
    xs = list(range(len(hops)))
    for offset, g in zip(offsets, block, strict=True):
        values = [_pct(g.metrics, k) for k in hops]
        method = str(g.method)
        bars = ax.bar([x + offset for x in xs], values, width, label=method, color=colours[method])
        if len(block) <= 4:  # value labels only while they still fit above the bars
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    base = next((g.base for g in block if g.base), None)
    if base:
        values = [_pct(base, k) for k in hops]
        ax.plot(xs, values, "k--o", label=BASE_METHOD, zorder=5)
    _hop_axis(ax, len(hops))
    ax.set_ylabel("Portability (token accuracy, %)")
    _percent_axis(ax)
    ax.legend(fontsize=8, loc="upper right")


def _hop_axis(ax: Axes, n_hops: int) -> None:
    ax.set_xticks(range(n_hops), [f"{i}-hop" for i in range(1, n_hops + 1)])
    ax.set_xlim(-0.5, n_hops - 0.5)  # keep every hop's slot even where a value is missing
    ax.set_xlabel("Hops from the edited fact")


def _relative_bars(ax: Axes, block: list[GroupSummary], hops: list[str], colours: dict[str, Any]) -> None:
    offsets, width = _bar_offsets(len(block))
    xs = list(range(len(hops)))
    drawn = False
    for offset, g in zip(offsets, block, strict=True):
        values = [math.nan if (c := relative_change(g, k)) is None else 100 * c for k in hops]
        drawn |= any(not math.isnan(v) for v in values)
        ax.bar([x + offset for x in xs], values, width, color=colours[str(g.method)])
    _hop_axis(ax, len(hops))
    if not drawn:  # the ratio is undefined when the unedited model scores 0 (or has no base)
        ax.text(
            0.5, 0.5, "undefined: unedited portability is 0 or missing", ha="center", transform=ax.transAxes
        )
        ax.set_yticks([])
        return
    from matplotlib.ticker import PercentFormatter

    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("(post − base) / base (%)")
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=100))
    ax.grid(axis="y", alpha=0.3)


# ---------------------------------------------------------------- sequential / lifelong


def plot_progression(summary: RunSummary, out_dir: Path, protocol: str = "sequential") -> Path | None:
    """One panel per metric (Rel, T-Gen, I-Gen, T-Loc, I-Loc, Port): a line per method over the gap."""
    groups = select_groups(summary, protocol, "all")
    step = "checkpoint" if protocol == "lifelong" else "gap"
    groups = [g for g in groups if getattr(g, step) is not None]
    keys = present_keys(groups, "metrics", SEQUENTIAL_ORDER)
    if not keys:
        return None
    colours = _colours(first_seen(summary.groups, "method"))
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = _figure(4.4 * ncols, 3.4 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax, key in zip(axes, keys, strict=False):
        _progression_panel(ax, groups, key, step, colours)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6), fontsize=9)
    fig.suptitle(_progression_title(protocol))
    return _save(fig, out_dir / f"{protocol}.png")


def _progression_title(protocol: str) -> str:
    if protocol == "lifelong":
        return "Lifelong editing: every case scored at each checkpoint"
    return "Sequential editing: case s−gap scored after edit s (VLKEB Fig. 4)"


def _progression_panel(
    ax: Axes, groups: list[GroupSummary], key: str, step: str, colours: dict[str, Any]
) -> None:
    """One line per (model, method): colour names the method, line style the model."""
    models = first_seen(groups, "model")
    for model_index, model in enumerate(models):
        for method, colour in colours.items():
            points = sorted(
                (getattr(g, step), _pct(g.metrics, key))
                for g in groups
                if str(g.model) == model and str(g.method) == method
            )
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            label = f"{model} / {method}" if len(models) > 1 else method
            style = LINE_STYLES[model_index % len(LINE_STYLES)]
            ax.plot(xs, ys, marker="o", linestyle=style, label=label, color=colour)
    steps = sorted({getattr(g, step) for g in groups})
    ax.set_xticks(steps)
    ax.set_title(f"{metric_label(key)}: {metric_name(key)}")
    ax.set_xlabel("Checkpoint (edits made)" if step == "checkpoint" else "Gap (edits between edit and test)")
    ax.set_ylabel("Agreement with unedited (%)" if _is_locality(key) else "Token accuracy (%)")
    _percent_axis(ax)


# ---------------------------------------------------------------- efficiency


def plot_efficiency(summary: RunSummary, out_dir: Path) -> Path | None:
    """Horizontal bars per method: seconds per edit (and per scoring) and peak memory in MB."""
    groups = _one_group_per_method(summary)
    has_time = any(g.efficiency.get("edit_seconds") is not None for g in groups)
    has_memory = any(g.efficiency.get("peak_memory_mb") is not None for g in groups)
    if not (has_time or has_memory):
        return None
    several = len(first_seen(groups, "model")) > 1
    labels = [_series_label(g, several) for g in groups]
    fig = _figure(12, 1.6 + 0.45 * len(groups))
    ax_time, ax_memory = fig.subplots(1, 2)
    _time_bars(ax_time, groups, labels)
    _hbars(ax_memory, labels, [_eff(g, "peak_memory_mb") for g in groups], "tab:purple", "{:,.0f} MB")
    ax_memory.set_title("Peak memory per edit")
    ax_memory.set_xlabel("Peak memory (MB)")
    return _save(fig, out_dir / "efficiency.png")


def _one_group_per_method(summary: RunSummary) -> list[GroupSummary]:
    groups = select_groups(summary, "single", "all") or select_groups(summary, "sequential", "all")
    seen: dict[tuple[str, str], GroupSummary] = {}
    for g in groups:
        seen.setdefault((str(g.model), str(g.method)), g)
    models, methods = first_seen(groups, "model"), first_seen(groups, "method")
    return sorted(seen.values(), key=lambda g: (models.index(str(g.model)), methods.index(str(g.method))))


def _eff(group: GroupSummary, key: str) -> float:
    value = group.efficiency.get(key)
    return math.nan if value is None else float(value)


def _time_bars(ax: Axes, groups: list[GroupSummary], labels: list[str]) -> None:
    ys = list(range(len(groups)))
    height = 0.38
    edit = [_eff(g, "edit_seconds") for g in groups]
    score = [_eff(g, "score_seconds") for g in groups]
    bars = ax.barh([y - height / 2 for y in ys], edit, height, color="tab:blue", label="edit")
    ax.bar_label(bars, labels=[_fmt(v, "{:.2f} s") for v in edit], fontsize=7, padding=2)
    bars = ax.barh([y + height / 2 for y in ys], score, height, color="tab:orange", label="scoring")
    ax.bar_label(bars, labels=[_fmt(v, "{:.2f} s") for v in score], fontsize=7, padding=2)
    ax.set_yticks(ys, labels)
    ax.invert_yaxis()  # first method on top, as in the tables
    ax.set_title("Latency per case")
    ax.set_xlabel("Wall time (s)")
    ax.margins(x=0.18)
    ax.legend(fontsize=8, loc="best")
    ax.grid(axis="x", alpha=0.3)


def _hbars(ax: Axes, labels: list[str], values: list[float], colour: str, fmt: str) -> None:
    ys = list(range(len(labels)))
    bars = ax.barh(ys, values, 0.6, color=colour)
    ax.bar_label(bars, labels=[_fmt(v, fmt) for v in values], fontsize=7, padding=2)
    ax.set_yticks(ys, labels)
    ax.invert_yaxis()
    ax.margins(x=0.18)
    ax.grid(axis="x", alpha=0.3)


def _fmt(value: float, fmt: str) -> str:
    return "" if math.isnan(value) else fmt.format(value)


# ---------------------------------------------------------------- teacher-forced vs generated


def plot_generation_gap(summary: RunSummary, out_dir: Path) -> Path | None:
    """Per model and method: generated − teacher-forced, in points, for each metric that asks for
    the target (how much teacher forcing overstates what the model itself answers)."""
    groups = [g for g in select_groups(summary, "single", "all") if g.generated]
    keys = [k for k in present_keys(groups, "generated", headline_keys()) if not _is_locality(k)]
    if not keys:
        return None
    models = first_seen(groups, "model")
    colours = _colours(keys)
    fig = _figure(12, 4.2 * len(models))
    axes = fig.subplots(len(models), 1, squeeze=False)
    for row, model in enumerate(models):
        ax, block = axes[row][0], [g for g in groups if str(g.model) == model]
        offsets, width = _bar_offsets(len(keys))
        xs = list(range(len(block)))
        for offset, key in zip(offsets, keys, strict=True):
            gaps = [_pct(g.generated, key) - _pct(g.metrics, key) for g in block]
            ax.bar([x + offset for x in xs], gaps, width, label=metric_label(key), color=colours[key])
        ax.axhline(0, color="k", linewidth=0.8)
        ax.set_xticks(xs, [str(g.method) for g in block], rotation=30, ha="right")
        ax.set_ylabel("generated − teacher-forced (points)")
        ax.set_title(f"{model}: free generation against teacher forcing")
        ax.legend(fontsize=8, ncol=len(keys))
    return _save(fig, out_dir / "generation_gap.png")


def make_plots(summary: RunSummary, out_dir: Path) -> list[Path]:
    """Every figure the summary has data for, as PNG files under ``out_dir``."""
    made = [
        plot_portability(summary, out_dir),
        plot_progression(summary, out_dir, "sequential"),
        plot_progression(summary, out_dir, "lifelong"),
        plot_efficiency(summary, out_dir),
        plot_generation_gap(summary, out_dir),
    ]
    return [p for p in made if p is not None]
