"""The report of a run directory: one self-contained ``report.html`` (tables, embedded plots, problems,
example cases, config) plus ``tables/*.md|csv|tex|json`` and ``plots/*.png``; and ``compare_runs``.
"""

from __future__ import annotations

import base64
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import yaml

from mmke.errors import BadRecordError, MmkeError
from mmke.eval.records import CaseRecord, ProbeResult, RunBlock, RunSummary
from mmke.report.tables import (
    Cell,
    ReportTable,
    best_cells,
    build_tables,
    compare_table,
    declared_order,
    display_rows,
    edit_type_label,
    metric_label,
    render_csv,
    render_json,
    render_latex,
    render_markdown,
)

log = logging.getLogger(__name__)

EXAMPLE_CASES = 4
MAX_MESSAGES = 20
MAX_PROBES_SHOWN = 16
#: Teacher-forced successes that generation misses, listed in the report (the count is of all).
MAX_DISAGREEMENTS = 40

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d232a;margin:0;
 background:#f6f7f9}
main{max-width:1240px;margin:0 auto;padding:24px 28px 60px;background:#fff}
h1{font-size:24px;margin:0 0 6px}
h2{font-size:19px;margin:34px 0 10px;border-bottom:2px solid #dde1e6;padding-bottom:4px}
h3{font-size:15px;margin:22px 0 6px}
.meta{color:#4a5560;margin:0 0 8px}.meta b{color:#1d232a}
nav{margin:10px 0 0;font-size:13px}nav a{margin-right:14px;color:#0b62a4;text-decoration:none}
table{border-collapse:collapse;margin:6px 0 4px;font-size:13px}
th,td{padding:4px 9px;border-bottom:1px solid #e3e6ea;text-align:left;white-space:nowrap}
th{background:#eef1f4;font-weight:600;border-bottom:2px solid #c9ced5}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tr.ref td{color:#66717c;font-style:italic;background:#fafbfc}
tr.first td{border-top:2px solid #c9ced5}
td.best{font-weight:700}
.note{color:#5b6670;font-size:12px;margin:0 0 14px}
.scroll{overflow-x:auto}
figure{margin:14px 0 26px}figure img{max-width:100%;border:1px solid #e3e6ea}
figcaption{color:#5b6670;font-size:12px}
pre{background:#f3f5f7;padding:10px 12px;overflow-x:auto;font-size:12px;border:1px solid #e3e6ea}
.case{border:1px solid #e3e6ea;padding:8px 14px 12px;margin:12px 0;border-radius:4px}
.edit{font-size:14px;margin:4px 0 8px}.edit .arrow{color:#0b62a4;font-weight:700;padding:0 6px}
.gen{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;white-space:pre-wrap}
.cols{display:flex;gap:32px;align-items:flex-start;flex-wrap:wrap}
.bad{color:#a4262c}.ok{color:#2b7a3d}
"""


# ---------------------------------------------------------------- reading a run


@dataclass
class CaseScan:
    """What the report needs from ``cases.jsonl``, gathered in one streaming pass."""

    n_records: int = 0
    #: One ``file:line: why`` per line that is not a case record (e.g. cut by a crash mid-write).
    unreadable: list[str] = field(default_factory=list)
    status: Counter = field(default_factory=Counter)  # (model, method, protocol, status) -> count
    messages: Counter = field(default_factory=Counter)  # (status, message) -> count
    examples: dict[str, list[CaseRecord]] = field(default_factory=dict)  # case id -> its records
    #: Probes teacher forcing calls a success (every target token right) that generation misses,
    #: up to ``MAX_DISAGREEMENTS``, and how many there were in all.
    disagreements: list[tuple[CaseRecord, ProbeResult]] = field(default_factory=list)
    n_disagreements: int = 0

    @property
    def n_unreadable(self) -> int:
        return len(self.unreadable)


def load_summary(run_dir: Path) -> RunSummary:
    """The run's ``summary.json``; a clear error when the folder is not a finished run."""
    path = run_dir / "summary.json"
    if not path.is_file():
        raise MmkeError(f"{run_dir}: no summary.json here; point at a runs/<id>/ folder of a finished run")
    return RunSummary.from_json(path.read_text(encoding="utf-8"), str(path))


def iter_records(path: Path) -> Iterator[CaseRecord | BadRecordError]:
    """Records of a ``cases.jsonl``, one per line; for a line that is no case record, the error
    naming its ``file:line`` (the report goes on past it, unlike a resuming run)."""
    if not path.is_file():
        return
    with path.open(encoding="utf-8") as lines:
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    yield CaseRecord.from_json(line, f"{path}:{n}")
                except BadRecordError as e:
                    yield e


def scan_cases(path: Path, n_examples: int = EXAMPLE_CASES) -> CaseScan:
    """Count statuses and messages, keep a few example cases, sum generation matches."""
    scan = CaseScan()
    for record in iter_records(path):
        if isinstance(record, BadRecordError):
            scan.unreadable.append(str(record))
            continue
        scan.n_records += 1
        run = record.run
        scan.status[(str(run.model), str(run.method), str(run.protocol), record.status)] += 1
        if not record.ok:
            scan.messages[(record.status, record.message or "(no message)")] += 1
        if run.protocol == "single":
            _keep_example(scan, record, n_examples)
            _add_disagreements(scan, record)
    return scan


def _keep_example(scan: CaseScan, record: CaseRecord, n_examples: int) -> None:
    if record.case_id in scan.examples:
        scan.examples[record.case_id].append(record)
    elif len(scan.examples) < n_examples and record.ok:
        scan.examples[record.case_id] = [record]


def _add_disagreements(scan: CaseScan, record: CaseRecord) -> None:
    if not record.ok:
        return
    for probe in record.probes:
        if probe.agreement is None and probe.exact_match == 1.0 and probe.generated_match == 0.0:
            scan.n_disagreements += 1
            if len(scan.disagreements) < MAX_DISAGREEMENTS:
                scan.disagreements.append((record, probe))


def _disagreements_html(scan: CaseScan) -> str:
    """The probes where teacher forcing says the edit worked and the model's own answer says not."""
    if not scan.n_disagreements:
        return (
            "<p>None: wherever teacher forcing got every target token right, generation matched "
            "too (or the run did not generate).</p>"
        )
    rows = [
        f"<tr><td>{escape(str(r.run.method))}</td><td>{escape(r.case_id)}</td>"
        f"<td>{escape(metric_label(p.kind))}</td><td>{escape(r.edit.prompt)}</td><td>{escape(r.edit.target)}</td>"
        f'<td class="gen">{escape(p.generated or "")}</td></tr>'
        for r, p in scan.disagreements
    ]
    cells = ("Method", "Case", "Probe", "Edit prompt", "New target", "Generated")
    head = "<tr>" + "".join(f"<th>{c}</th>" for c in cells) + "</tr>"
    shown = f" (the first {len(rows)})" if scan.n_disagreements > len(rows) else ""
    return (
        f"<p>{scan.n_disagreements} probe(s) with every target token right under teacher forcing but a "
        f"generated answer that does not match{shown}:</p>"
        f'<div class="scroll"><table><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table></div>'
    )


# ---------------------------------------------------------------- writing the report


def write_tables(tables: list[ReportTable], out_dir: Path) -> list[Path]:
    """Each table as ``<name>.md``, ``.csv`` and ``.tex``, plus all of them in ``tables.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for table in tables:
        for suffix, render in ((".md", render_markdown), (".csv", render_csv), (".tex", render_latex)):
            path = out_dir / f"{table.name}{suffix}"
            path.write_text(render(table), encoding="utf-8")
            written.append(path)
    (out_dir / "tables.json").write_text(render_json(tables), encoding="utf-8")
    return [*written, out_dir / "tables.json"]


def _make_plots(summary: RunSummary, out_dir: Path) -> tuple[list[Path], str]:
    """Plots, or none and the reason when matplotlib (the ``report`` extra) is missing."""
    try:
        from mmke.report.plots import make_plots

        return make_plots(summary, out_dir), ""  # matplotlib is imported here, at first use
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("matplotlib"):
            raise
        return [], "no plots: matplotlib is not installed (pip install 'mmke[report]')"


def write_report(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Write ``report.html`` (self-contained), ``tables/`` and ``plots/`` into ``out_dir`` (default:
    ``run_dir``, which is only read: a read-only finished run can be reported elsewhere)."""
    run_dir = Path(run_dir)
    out_dir = run_dir if out_dir is None else Path(out_dir)
    summary = load_summary(run_dir)
    scan = scan_cases(run_dir / "cases.jsonl")
    tables = build_tables(summary)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_tables(tables, out_dir / "tables")
    plots, plot_problem = _make_plots(summary, out_dir / "plots")
    page = _page(run_dir, summary, scan, tables, plots, plot_problem)
    out = out_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    log.info("wrote %s (%d tables, %d plots)", out, len(tables), len(plots))
    return out


def _page(
    run_dir: Path,
    summary: RunSummary,
    scan: CaseScan,
    tables: list[ReportTable],
    plots: list[Path],
    plot_problem: str,
) -> str:
    sections = [
        (
            "results",
            "Results",
            "".join(html_table(t) for t in tables) or "<p>No results in summary.json.</p>",
        ),
        ("plots", "Plots", _plots_html(plots, plot_problem)),
        ("gap", "Teacher forcing says yes, generation says no", _disagreements_html(scan)),
        ("problems", "Collapsed and failed cases", _problems_html(scan)),
        ("examples", "Example cases", _examples_html(scan)),
        ("config", "Configuration", _config_html(run_dir, summary)),
    ]
    nav = "".join(f'<a href="#{key}">{title}</a>' for key, title, _ in sections)
    body = "".join(f'<section id="{key}"><h2>{title}</h2>{html}</section>' for key, title, html in sections)
    title = f"mmke report: {escape(run_dir.name)}"
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{CSS}</style></head><body><main><h1>{title}</h1>{_run_line(summary)}"
        f"<nav>{nav}</nav>{body}</main></body></html>\n"
    )


def _run_line(summary: RunSummary) -> str:
    info = summary.run
    # a finished run's summary holds its config hash; one rebuilt from records, what they all share
    run = {**info.common, **({"config_hash": info.config_hash} if info.config_hash else {})}
    fields = [
        "model",
        "method",
        "benchmark",
        "benchmark_version",
        "protocol",
        "scoring",
        "seed",
        "config_hash",
    ]
    parts = [f"{escape(k)} <b>{escape(_short(run[k]))}</b>" for k in fields if run.get(k) not in (None, "")]
    return f'<p class="meta">{" · ".join(parts)}</p>' if parts else ""


def _short(value: Any) -> str:
    text = ", ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
    return text if len(text) <= 80 else text[:77] + "…"


def html_table(table: ReportTable, heading: bool = True) -> str:
    """A ``ReportTable`` as an HTML table: best cells bold, base rows muted, a rule between groups."""
    best = best_cells(table)
    head = "".join(
        f'<th class="{_cls(f)}">{escape(c)}</th>' for c, f in zip(table.columns, table.formats, strict=True)
    )
    rows = []
    for i, cells in enumerate(display_rows(table, escape=escape)):
        classes = [
            "ref" if i in table.reference_rows else "",
            "first" if i and table.group_columns and cells[0] else "",
        ]
        tds = "".join(
            f'<td class="{_cls(f)}{" best" if (i, j) in best else ""}">{c}</td>'
            for j, (c, f) in enumerate(zip(cells, table.formats, strict=True))
        )
        rows.append(f'<tr class="{" ".join(c for c in classes if c)}">{tds}</tr>')
    note = f'<p class="note">{escape(table.note)}</p>' if table.note else ""
    title = f'<h3 id="t-{escape(table.name)}">{escape(table.title)}</h3>' if heading else ""
    return (
        f'{title}<div class="scroll"><table>'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>{note}"
    )


def _cls(fmt: str) -> str:
    return "num" if fmt else ""


def _plots_html(plots: list[Path], problem: str) -> str:
    if not plots:
        return f"<p>{escape(problem or 'No data for plots in this run.')}</p>"
    figures = []
    for path in plots:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        caption = escape(path.stem.replace("_", " "))
        figures.append(
            f'<figure><img alt="{caption}" src="data:image/png;base64,{data}">'
            f"<figcaption>{caption} (plots/{escape(path.name)})</figcaption></figure>"
        )
    return "".join(figures)


def _problems_html(scan: CaseScan) -> str:
    runs = dict.fromkeys(key[:3] for key in scan.status)  # (model, method, protocol), first seen
    rows = [(*run, *(scan.status[(*run, s)] for s in ("ok", "collapsed", "error"))) for run in runs]
    table = ReportTable(
        name="status",
        title=f"{scan.n_records:,} case records",
        columns=("Model", "Method", "Protocol", "OK", "Collapsed", "Error"),
        rows=tuple(rows),
        formats=("", "", "", "{:,}", "{:,}", "{:,}"),
        group_columns=1,
    )
    parts = [html_table(table) if rows else "<p>No cases.jsonl records.</p>"]
    if scan.unreadable:
        lines = "".join(f"<li><code>{escape(line)}</code></li>" for line in scan.unreadable[:MAX_MESSAGES])
        parts.append(
            f'<p class="bad">{scan.n_unreadable} unreadable line(s) in cases.jsonl:</p><ul>{lines}</ul>'
        )
    if scan.messages:
        items = "".join(
            f'<li><span class="bad">{escape(status)}</span> ×{n}: <code>{escape(message)}</code></li>'
            for (status, message), n in scan.messages.most_common(MAX_MESSAGES)
        )
        parts.append(f"<h3>Messages</h3><ul>{items}</ul>")
    else:
        parts.append('<p class="ok">No collapsed or failed cases.</p>')
    return "".join(parts)


def _examples_html(scan: CaseScan) -> str:
    if not scan.examples:
        return "<p>No single-editing cases to show.</p>"
    return "".join(_case_html(case_id, records) for case_id, records in scan.examples.items())


def _case_html(case_id: str, records: list[CaseRecord]) -> str:
    first = records[0]
    prompt, target = first.edit.prompt, first.edit.target
    edit = (
        f'<p class="edit">{escape(prompt)}<span class="arrow">→</span><b>{escape(target)}</b></p>'
        if prompt or target
        else '<p class="note">(the record does not carry the edit prompt and target)</p>'
    )
    edit_type = edit_type_label(first.edit_type)
    header = f"<h3>{escape(case_id)} <small>({escape(edit_type)})</small></h3>"
    body = (
        f'<div class="cols"><div>{_case_scores(records)}</div><div>{_case_generations(records)}</div></div>'
    )
    return f'<div class="case">{header}{edit}{body}</div>'


def _case_scores(records: list[CaseRecord]) -> str:
    """Scores of one case: a row per metric, a column per method (narrow enough for a card)."""
    keys = declared_order({k for r in records for k in r.metrics})
    several = len({str(r.run.model) for r in records}) > 1
    names = [_run_name(r.run, several) for r in records]
    rows: list[tuple[Cell, ...]] = []
    if any(not r.ok for r in records):
        rows.append(("status", *(r.status for r in records)))
    for k in keys:
        cells = [_score_cell(r.metrics.get(k), r.exact_match.get(k)) for r in records]
        rows.append((metric_label(k), *cells))
    table = ReportTable(
        name="case",
        title="",
        columns=("Metric", *names),
        rows=tuple(rows),
        formats=("", *("{}" for _ in names)),
    )
    return html_table(table, heading=False) + '<p class="note">token accuracy % (exact match %)</p>'


def _run_name(run: RunBlock, several_models: bool) -> str:
    method = str(run.method)
    return f"{run.model} / {method}" if several_models else method


def _score_cell(token: float | None, exact: float | None) -> str:
    if token is None:
        return "–"
    return f"{100 * token:.0f}" + ("" if exact is None else f" ({100 * exact:.0f})")


def _case_generations(records: list[CaseRecord]) -> str:
    """Decoded answers per probe, when the run generated (``--generate``)."""
    rows = []
    for r in records:
        method = str(r.run.method)
        for probe in r.probes[:MAX_PROBES_SHOWN]:
            if probe.generated is None:
                continue
            kind = metric_label(probe.kind)
            detail = f" hop {probe.hop}" if probe.hop else ""
            detail += f" {probe.attack}" if probe.attack else ""
            match = probe.generated_match
            mark = (
                ""
                if match is None
                else ('<span class="ok">✓</span>' if match >= 1 else '<span class="bad">✗</span>')
            )
            rows.append(
                f"<tr><td>{escape(method)}</td><td>{escape(kind + detail)}</td>"
                f'<td class="gen">{escape(probe.generated)}</td><td>{mark}</td></tr>'
            )
    if not rows:
        return ""
    head = "<tr><th>Method</th><th>Probe</th><th>Generated</th><th>Match</th></tr>"
    return f'<div class="scroll"><table><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table></div>'


def _config_html(run_dir: Path, summary: RunSummary) -> str:
    path = run_dir / "config.yaml"
    if path.is_file():
        text, source = path.read_text(encoding="utf-8"), "config.yaml"
    else:
        text, source = yaml.safe_dump(summary.run.to_dict(), sort_keys=False), "summary.json run"
    return f'<p class="note">from {escape(source)}</p><pre>{escape(text)}</pre>'


# ---------------------------------------------------------------- comparing runs


def compare_runs(a: Path, b: Path, *, mixed: bool = False) -> str:
    """Markdown: two runs side by side, rows model x method, per metric A / B / Δ (for ``mmke compare``);
    rows scored by different definitions are refused unless ``mixed`` (then marked)."""
    table = compare_table(load_summary(Path(a)), load_summary(Path(b)), mixed=mixed)
    return f"A = `{a}`  \nB = `{b}`\n\n" + render_markdown(table)
