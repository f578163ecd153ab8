"""Evaluation: typed records, metrics declared once, protocols, the runner, executors and the run store."""

from mmke.eval.metrics import (
    MetricSpec,
    metric,
    metric_specs,
    probe_result,
    score_case,
    string_match,
    summarize,
)
from mmke.eval.records import CaseRecord, GroupSummary, ProbeResult, RunBlock, RunInfo, RunSummary
from mmke.eval.store import RunStore, config_hash

__all__ = [
    "CaseRecord",
    "GroupSummary",
    "MetricSpec",
    "ProbeResult",
    "RunBlock",
    "RunInfo",
    "RunStore",
    "RunSummary",
    "config_hash",
    "metric",
    "metric_specs",
    "probe_result",
    "score_case",
    "string_match",
    "summarize",
]
