"""A loaded benchmark: its edit cases, where their images live, and what to call it in results."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmke.types import EditCase


@dataclass(frozen=True)
class Benchmark:
    """Cases to evaluate (and, for trainable editors, cases to train on) plus their image root."""

    name: str
    version: str
    cases: tuple[EditCase, ...]
    image_root: Path | None
    train_cases: tuple[EditCase, ...] = ()


def load_benchmark(spec: str, image_root: Path | None = None) -> Benchmark:
    """``name[:arg]`` -> a Benchmark through the registry (``world``, ``world:3``, ``native:cases.jsonl``)."""
    from mmke.registry import benchmarks

    name, _, arg = spec.partition(":")
    return benchmarks.get(name)(arg or None, image_root=image_root)
