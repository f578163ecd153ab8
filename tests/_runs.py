"""Helpers for end-to-end runs on the `setup` fixture's small world (conftest.py)."""

from __future__ import annotations

from pathlib import Path

from mmke.config import load_config
from mmke.eval.executors import Executor
from mmke.eval.job import run
from mmke.eval.records import CaseRecord, RunSummary
from mmke.eval.store import RunStore


def small_overrides(setup: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    world, model_dir = setup
    return [
        f"benchmark=native:{world / 'cases_eval.jsonl'}",
        f"image_root={world}",
        f"model={model_dir}",
        f"out={out}",
        "limit=6",
        "method_options.ft_llm.steps=3",
        "method_options.ft_llm.lr=0.01",
        *extra,
    ]


def small_run(
    setup: tuple[Path, Path], out: Path, *extra: str, executor: Executor | None = None
) -> tuple[RunStore, RunSummary]:
    cfg = load_config(None, small_overrides(setup, out, *extra))
    store = RunStore.create(out, None, cfg.to_dict())
    return store, run(cfg, store, executor=executor)


def without_timings(records: list[CaseRecord]) -> list[dict]:
    """The records as JSON data without their timings (which differ between any two runs)."""
    return [{k: v for k, v in r.to_dict().items() if k != "efficiency"} for r in records]
