"""Reports of a run: paper-style tables (markdown, CSV, LaTeX, JSON, terminal), plots and one HTML page,
read from its typed ``RunSummary`` and ``CaseRecord``s, labelled by the metric declarations."""

from mmke.report.html import compare_runs, write_report
from mmke.report.tables import (
    ReportTable,
    build_tables,
    compare_table,
    metric_label,
    render_csv,
    render_json,
    render_latex,
    render_markdown,
    rich_table,
)

__all__ = [
    "ReportTable",
    "build_tables",
    "compare_runs",
    "compare_table",
    "metric_label",
    "render_csv",
    "render_json",
    "render_latex",
    "render_markdown",
    "rich_table",
    "write_report",
]
