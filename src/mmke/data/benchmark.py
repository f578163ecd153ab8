"""A loaded benchmark: its edit cases, where their images live, and what to call it in results."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmke.data.schema import Problem
from mmke.types import EditCase


@dataclass(frozen=True)
class Benchmark:
    """Cases to evaluate (and, for trainable editors, cases to train on) plus their image root.

    ``skipped`` lists the records left out under ``skip_bad`` (the run stores them with it).
    """

    name: str
    version: str
    cases: tuple[EditCase, ...]
    image_root: Path | None
    train_cases: tuple[EditCase, ...] = ()
    skipped: tuple[Problem, ...] = ()


def load_benchmark(
    spec: str,
    image_root: Path | None = None,
    *,
    skip_bad: bool = False,
    options: Mapping[str, Any] | None = None,
) -> Benchmark:
    """``name[:arg]`` -> a Benchmark through the registry (``world``, ``world:3``, ``vlkeb:eval.json``).

    ``options`` are the reader's own settings (``benchmark_options`` in a run config); a reader
    refuses names it does not know. Bad records stop the load unless ``skip_bad``.
    """
    from mmke.registry import benchmarks

    name, _, arg = spec.partition(":")
    return benchmarks.get(name)(arg or None, image_root=image_root, skip_bad=skip_bad, **dict(options or {}))
