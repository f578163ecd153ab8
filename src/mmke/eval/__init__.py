"""Evaluation: typed records, metrics declared once, protocols, the runner, executors and the run store."""

from mmke.eval.answers import answer_matches, first_answer, normalize_answer, same_answer
from mmke.eval.metrics import MetricSpec, metric, metric_specs, probe_result, score_case, summarize
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
    "answer_matches",
    "config_hash",
    "first_answer",
    "metric",
    "metric_specs",
    "normalize_answer",
    "probe_result",
    "same_answer",
    "score_case",
    "summarize",
]
