"""Build pipelines: registered steps run in order over one output folder, item steps cached by their inputs.

A pipeline file (YAML) names the benchmark, its seed and its steps::

    name: medical-demo
    seed: 0
    steps:
      - read_mcq_csv: {path: items.csv, image_root: images}
      - counterfactual: {strategy: nearest_option}
      - rephrase: {generator: {backend: templates}}
      - write: {}

Item steps transform a draft (a list of JSON records) that is saved after every step in
``OUT/.build/draft.json``, so ``mmke build STEP OUT`` can run one step alone; their result is
cached under ``OUT/.build/steps`` by a hash of the step, its settings and its input draft, so a
re-run recomputes only what changed. Other steps (the world's) pass objects in memory.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmke.errors import BadRecordError, ConfigError
from mmke.io import write_atomic
from mmke.registry import build_steps, register_step

log = logging.getLogger(__name__)

DRAFT_FORMAT = "mmke-draft"
DRAFT_VERSION = 1
Item = dict[str, Any]


@dataclass(frozen=True)
class Step:
    """One step of a pipeline: a registered step name and its settings."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pipeline:
    """A named, seeded list of steps; relative input paths resolve against ``base``."""

    name: str
    steps: tuple[Step, ...]
    seed: int = 0
    base: Path = Path(".")

    @classmethod
    def read(cls, path: Path) -> Pipeline:
        """Read a pipeline YAML file (steps as ``- name: {settings}`` or a bare ``- name``)."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read the pipeline ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
            raise ConfigError(f"{path}: a pipeline is a mapping with 'name', 'seed' and a list of 'steps'")
        unknown = sorted(set(data) - {"name", "seed", "steps"})
        if unknown:
            raise ConfigError(f"{path}: unknown pipeline key(s) {unknown} (keys: name, seed, steps)")
        seed = data.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"{path}: seed must be a non-negative integer, got {seed!r}")
        steps = tuple(_step(s, path, i) for i, s in enumerate(data["steps"]))
        return cls(str(data.get("name") or path.stem), steps, seed, path.parent)


def _step(raw: Any, path: Path, i: int) -> Step:
    if isinstance(raw, str):
        return Step(raw)
    if isinstance(raw, dict) and len(raw) == 1:
        ((name, params),) = raw.items()
        if params is None or isinstance(params, dict):
            return Step(str(name), dict(params or {}))
    raise ConfigError(f"{path}: steps[{i}] must be a step name or {{name: {{settings}}}}, got {raw!r}")


@dataclass
class Context:
    """What the steps of one run share: where they write, the seed, inputs' folder, and artifacts."""

    out: Path
    seed: int = 0
    base: Path = Path(".")
    name: str = "benchmark"
    artifacts: dict[str, Any] = field(default_factory=dict)

    def input(self, path: str | Path) -> Path:
        """A path from the pipeline's settings, relative to the pipeline file's folder."""
        p = Path(path)
        return p if p.is_absolute() else self.base / p

    @property
    def work(self) -> Path:
        """The folder of the build's own state (draft, caches, failure reports)."""
        return self.out / ".build"

    @property
    def items(self) -> list[Item]:
        return self.artifacts.setdefault("items", [])

    def report_failures(self, step: str, failures: list[dict[str, Any]]) -> None:
        """Append failures to ``.build/failures.jsonl`` and log their count: never silently dropped."""
        if not failures:
            return
        self.work.mkdir(parents=True, exist_ok=True)
        with open(self.work / "failures.jsonl", "a", encoding="utf-8") as f:
            for fail in failures:
                f.write(json.dumps({"step": step, **fail}, sort_keys=True) + "\n")
        log.warning("%s: %d item(s) failed; see %s", step, len(failures), self.work / "failures.jsonl")


def run_pipeline(pipe: Pipeline, out: Path, progress: Callable[[str], None] | None = None) -> Context:
    """Run every step of ``pipe`` into ``out``; returns the context (its artifacts hold the results)."""
    ctx = Context(Path(out), pipe.seed, pipe.base, pipe.name)
    ctx.out.mkdir(parents=True, exist_ok=True)
    for step in pipe.steps:
        if progress:
            progress(step.name)
        run_step(ctx, step)
    return ctx


def run_step(ctx: Context, step: Step) -> None:
    """Run one registered step with its settings checked against the step's signature."""
    fn = build_steps.get(step.name)
    sig = inspect.signature(fn)
    settings = list(sig.parameters)[1:]
    try:
        sig.bind(ctx, **step.params)
    except TypeError as e:
        raise ConfigError(f"step {step.name!r}: {e} (settings: {', '.join(settings) or 'none'})") from None
    fn(ctx, **step.params)


# ---------------------------------------------------------------- item steps


def item_step(name: str, help: str = "", cached: bool = True) -> Callable[[Callable[..., list[Item]]], Any]:
    """Register ``fn(ctx, items, **settings) -> items`` as a step over the draft (cached, saved after)."""

    def deco(fn: Callable[..., list[Item]]) -> Any:
        @functools.wraps(fn)
        def run(ctx: Context, **params: Any) -> None:
            before = ctx.items
            key = _key(name, params, before, ctx) if cached else None
            hit = _cached(ctx, name, key)
            items = hit if hit is not None else fn(ctx, [dict(x) for x in before], **params)
            if key is not None and hit is None:
                _store(ctx.work / "steps" / f"{name}-{key}.json", items)
            ctx.artifacts["items"] = items
            save_draft(ctx)

        sig = inspect.signature(fn)
        params = [p for n, p in sig.parameters.items() if n != "items"]
        run.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        run.item_step = True  # type: ignore[attr-defined]
        return register_step(name, help)(run)

    return deco


def _key(name: str, params: Mapping[str, Any], items: list[Item], ctx: Context) -> str:
    """Hash of the step, its settings, the seed, the input draft and any input file a setting names."""
    files = {
        v: _file_hash(ctx.input(v)) for v in params.values() if isinstance(v, str) and ctx.input(v).is_file()
    }
    blob = json.dumps([name, dict(params), ctx.seed, items, files], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cached(ctx: Context, name: str, key: str | None) -> list[Item] | None:
    if key is None:
        return None
    path = ctx.work / "steps" / f"{name}-{key}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(data, list):
        log.info("%s: reusing %s", name, path)
        return data
    return None


def _store(path: Path, obj: Any) -> None:
    """Write JSON atomically (a cut run never leaves a half file that a later run would trust)."""
    write_atomic(path, json.dumps(obj, ensure_ascii=False, indent=1, sort_keys=True) + "\n")


def save_draft(ctx: Context) -> None:
    _store(
        ctx.work / "draft.json",
        {
            "format": DRAFT_FORMAT,
            "version": DRAFT_VERSION,
            "name": ctx.name,
            "seed": ctx.seed,
            "base": str(ctx.base.resolve()),
            "items": ctx.items,
        },
    )


def open_draft(out: Path) -> Context:
    """The context of a build folder from its saved draft (to run one more step by hand)."""
    path = Path(out) / ".build" / "draft.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadRecordError(f"{path}: no draft here; run a pipeline or a reading step first") from None
    except (OSError, ValueError) as e:
        raise BadRecordError(f"{path}: cannot read the draft ({e})") from None
    if (
        not isinstance(data, dict)
        or data.get("format") != DRAFT_FORMAT
        or data.get("version") != DRAFT_VERSION
    ):
        raise BadRecordError(f"{path}: not an {DRAFT_FORMAT} v{DRAFT_VERSION} file")
    ctx = Context(Path(out), int(data["seed"]), Path(data["base"]), str(data["name"]))
    ctx.artifacts["items"] = list(data["items"])
    return ctx


def is_item_step(name: str) -> bool:
    return bool(getattr(build_steps.get(name), "item_step", False))
