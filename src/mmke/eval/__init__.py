"""Evaluation: pure metrics over probe scores, and the run store (append-only records, resume, summary)."""

from mmke.eval.metrics import (
    METRICS,
    ProbeResult,
    agreement,
    case_metrics,
    metric_key,
    probe_result,
    score_case,
    string_match,
    summarize,
    topk_rankwise,
)
from mmke.eval.store import RunStore, config_hash, record_key

__all__ = [
    "METRICS",
    "ProbeResult",
    "RunStore",
    "agreement",
    "case_metrics",
    "config_hash",
    "metric_key",
    "probe_result",
    "record_key",
    "score_case",
    "string_match",
    "summarize",
    "topk_rankwise",
]
