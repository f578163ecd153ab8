"""The runner: score the unedited model once, then for each method walk a protocol's schedule.

``score_pre → apply → score_post → restore → record``, with every probe of a case (and, for the
pre-edit pass, of all cases) batched into few forward passes. Each finished case is appended
to the run store at once, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from mmke.config import RunConfig
from mmke.data.benchmark import Benchmark
from mmke.data.images import ImageStore
from mmke.errors import BadRecordError, ConfigError, MmkeError
from mmke.eval import protocols
from mmke.eval._efficiency import measure
from mmke.eval.metrics import behavioural_collapse, score_case, string_match
from mmke.eval.store import RECORD_SCHEMA, ResumeKey, RunStore, record_key
from mmke.methods.base import EditCollapsed, Edited, Editor, EditorNotReadyError
from mmke.models import LVLM
from mmke.models._loading import bundled_or_path
from mmke.models.scoring import ItemScore
from mmke.types import EditCase, ProbeKind

if TYPE_CHECKING:
    from mmke.eval.executors import Executor

log = logging.getLogger(__name__)

#: Called after each recorded case: (cases recorded so far, total planned, method name).
Progress = Callable[[int, int, str], None]


class ScoresNotFinite(MmkeError):
    """The edited model produced NaN/inf: recorded as a collapse, never raised to the user."""


class Sink(Protocol):
    """Where finished case records go: the run store itself, or a worker's line back to it."""

    config_hash: str

    def append(self, record: Mapping[str, Any]) -> None: ...

    def done_keys(self) -> set[ResumeKey]: ...


@dataclass
class Session:
    """What one run (or one worker) holds for its whole length: model, cases, pre-edit scores, sink."""

    cfg: RunConfig
    model: LVLM
    model_name: str
    bench: Benchmark
    cases: tuple[EditCase, ...]
    images: ImageStore | None
    store: Sink
    pre: dict[str, list[ItemScore]]
    progress: Progress | None = None
    recorded: int = 0
    planned: int = 0
    editors: dict[str, Editor] = field(default_factory=dict)

    def ensure_pre(self, indices: Sequence[int]) -> None:
        """Score the unedited model on those of these cases it has not scored yet (one batched pass)."""
        missing = [self.cases[i] for i in indices if self.cases[i].case_id not in self.pre]
        if missing:
            torch.manual_seed(self.cfg.seed)
            cfg = self.cfg
            self.pre.update(score_pre(self.model, missing, self.images, cfg.batch_size, cfg.scoring))


def select_cases(cases: Sequence[EditCase], limit: int | None, edit_types: Sequence[str] | None) -> tuple:
    """The cases a run uses: filtered by edit type, then round-robin across types up to ``limit``.

    Round-robin keeps a small run representative of every edit type, deterministically.
    """
    kept = [c for c in cases if edit_types is None or c.edit_type.value in edit_types]
    if limit is None or limit >= len(kept):
        return tuple(kept)
    by_type: dict[str, list[EditCase]] = {}
    for c in kept:
        by_type.setdefault(c.edit_type.value, []).append(c)
    queues = [list(reversed(q)) for q in by_type.values()]
    chosen: list[EditCase] = []
    while len(chosen) < limit:
        for q in queues:
            if q and len(chosen) < limit:
                chosen.append(q.pop())
    order = {c.case_id: i for i, c in enumerate(kept)}
    return tuple(sorted(chosen, key=lambda c: order[c.case_id]))


def score_pre(
    model: LVLM,
    cases: Sequence[EditCase],
    images: ImageStore | None,
    batch_size: int,
    scoring: str = "mmke",
) -> dict:
    """Every probe of every case on the unedited model, in one batched pass (reused by all methods)."""
    probes = [p for c in cases for p in c.probes]
    scored = list(model.score(probes, images, batch_size=batch_size, scoring=scoring))
    out: dict[str, list[ItemScore]] = {}
    start = 0
    for c in cases:
        out[c.case_id] = scored[start : start + len(c.probes)]
        start += len(c.probes)
    return out


# --- one case -----------------------------------------------------------------------------


def _run_block(s: Session, method: str, protocol: str, gap: int | None, checkpoint: int | None) -> dict:
    return {
        "model": s.model_name,
        "method": method,
        "benchmark": s.bench.name,
        "benchmark_version": s.bench.version,
        "protocol": protocol,
        "gap": gap,
        "checkpoint": checkpoint,
        "seed": s.cfg.seed,
        "config_hash": s.store.config_hash,
        "scoring": s.cfg.scoring,
    }


def _post_scores(s: Session, edited: Edited, case: EditCase) -> tuple[list[ItemScore], list[str] | None]:
    post = list(edited.score(case.probes, s.images, batch_size=s.cfg.batch_size, scoring=s.cfg.scoring))
    if not all(math.isfinite(x.nll) for x in post):
        raise ScoresNotFinite("non-finite logits (NaN/inf) after the edit")
    gens = edited.generate(case.probes, s.images, batch_size=s.cfg.batch_size) if s.cfg.generate else None
    return post, gens


def _record(
    s: Session, run: dict, case: EditCase, index: int, scored: dict | None, cost: dict, failure: tuple | None
) -> None:
    status, message, at = failure if failure else ("ok", None, None)
    record: dict[str, Any] = {
        "schema": RECORD_SCHEMA,
        "run": run,
        "case_id": case.case_id,
        "edit_type": case.edit_type.value,
        "index": index,
        "status": status,
        "message": message,
        "collapsed_at": at,
        "edit": {
            "prompt": case.edit.prompt,
            "target": case.edit.target,
            "ground_truth": case.edit.ground_truth,
        },
        "efficiency": cost,
    }
    record.update(scored or {"metrics": {}, "exact_match": {}, "base": {}, "probes": []})
    s.store.append(record)
    s.recorded += 1
    if s.progress is not None:
        s.progress(s.recorded, s.planned, run["method"])


def _score_and_record(
    s: Session, run: dict, edited: Edited, case: EditCase, index: int, cost: dict, pre: list | None = None
) -> bool:
    """Score one case through ``edited`` and append its record; False when the model collapsed.

    ``pre`` defaults to the case's cached pre-edit scores (one per probe of the stored case).
    """
    with measure(s.model.device) as m:
        try:
            post, gens = _post_scores(s, edited, case)
        except ScoresNotFinite as e:
            post, gens, failure = None, None, ("collapsed", str(e), index)
        else:
            failure = None
    cost = cost | {"score_seconds": m.seconds}
    if post is None:
        _record(s, run, case, index, None, cost, failure)
        return False
    scored = score_case(case.probes, post, pre or s.pre[case.case_id], s.cfg.scoring, gens)
    _attach_generation_matches(scored, case, gens)
    if run["protocol"] != "single" and behavioural_collapse(scored["metrics"]):
        why = f"behavioural collapse after edit {index}: every probe scores 0 (weights are finite)"
        _record(s, run, case, index, scored, cost, ("collapsed", why, index))
        return False
    _record(s, run, case, index, scored, cost, None)
    return True


def _attach_generation_matches(scored: dict, case: EditCase, gens: list[str] | None) -> None:
    if gens is None:
        return
    for probe, entry, text in zip(case.probes, scored["probes"], gens, strict=True):
        entry["generated"] = text
        entry["generated_match"] = string_match(text, probe.target)


def _apply(s: Session, editor: Editor, case: EditCase, index: int) -> tuple[Edited, dict]:
    """Apply one edit under the run's seed (per stream position, so a resumed run matches)."""
    torch.manual_seed(s.cfg.seed * 1_000_003 + index)
    with measure(s.model.device) as m:
        edited = editor.apply(s.model, case, s.images)
    cost = {"edit_seconds": m.seconds, "peak_memory_mb": m.peak_mb, "edited_params": edited.edited_params}
    return edited, cost


def _failure_record(s: Session, run: dict, case: EditCase, index: int, e: Exception) -> None:
    status = "collapsed" if isinstance(e, EditCollapsed) else "error"
    at = index if isinstance(e, EditCollapsed) else None
    log.warning("%s %s: %s", run["method"], case.case_id, e)
    _record(s, run, case, index, None, {}, (status, f"{type(e).__name__}: {e}", at))


# --- protocols ----------------------------------------------------------------------------


def _positions(s: Session, indices: Sequence[int] | None) -> list[int]:
    return list(range(len(s.cases))) if indices is None else list(indices)


def run_single(s: Session, editor: Editor, method: str, indices: Sequence[int] | None = None) -> None:
    """Edit, score, restore — each case (or each of ``indices``) on the unedited model."""
    run = _run_block(s, method, "single", None, None)
    done = s.store.done_keys()
    for index in _positions(s, indices):
        case = s.cases[index]
        if record_key({"run": run, "case_id": case.case_id}) in done:
            continue
        try:
            edited, cost = _apply(s, editor, case, index)
        except (EditCollapsed, MmkeError) as e:
            _failure_record(s, run, case, index, e)
            continue
        with edited:
            _score_and_record(s, run, edited, case, index, cost)


def run_sequential(s: Session, editor: Editor, method: str, gap: int) -> None:
    """After edit k (k >= gap) score case k - gap on the model holding all edits so far.

    A stream is replayed from its start on resume (edits are deterministic per position),
    and it stops at the first collapse, which is recorded with its edit index.
    """
    run = _run_block(s, method, "sequential", gap, None)
    done = s.store.done_keys()
    stack: list[tuple[Edited, dict]] = []
    try:
        for step in protocols.sequential(len(s.cases), gap):
            case = s.cases[step.edit]
            try:
                stack.append(_apply(s, editor, case, step.edit))
            except (EditCollapsed, MmkeError) as e:
                _failure_record(s, run, case, step.edit, e)
                return
            for i in step.score:
                target = s.cases[i]
                if record_key({"run": run, "case_id": target.case_id}) in done:
                    continue
                # score through the scored case's own handle: for weight edits it is the same
                # model; for prompt methods (IKE) it is that fact's context, retrieved from memory
                if not _score_and_record(s, run, stack[i][0], target, step.edit, stack[i][1]):
                    return
    finally:
        _restore_all(stack)


def run_lifelong(s: Session, editor: Editor, method: str) -> None:
    """Edit the whole stream without restoring; at each checkpoint score every case edited so far."""
    stack: list[tuple[Edited, dict]] = []
    try:
        for step in protocols.lifelong(len(s.cases), s.cfg.checkpoints):
            case = s.cases[step.edit]
            try:
                stack.append(_apply(s, editor, case, step.edit))
            except (EditCollapsed, MmkeError) as e:
                _failure_record(s, _run_block(s, method, "lifelong", None, step.edit + 1), case, step.edit, e)
                return
            if step.score and not _score_checkpoint(s, method, stack, step.edit + 1):
                return
    finally:
        _restore_all(stack)


def _score_checkpoint(s: Session, method: str, stack: list[tuple[Edited, dict]], checkpoint: int) -> bool:
    run = _run_block(s, method, "lifelong", None, checkpoint)
    done = s.store.done_keys()
    for i, (edited, cost) in enumerate(stack):
        case = s.cases[i]
        if record_key({"run": run, "case_id": case.case_id}) in done:
            continue
        if not _score_and_record(s, run, edited, case, i, cost):
            return False
    return True


def run_edit_onehop(s: Session, editor: Editor, method: str, indices: Sequence[int] | None = None) -> None:
    """VLKEB's edit-one-hop: write the edit, then its one-hop fact, then ask the portability questions."""
    run = _run_block(s, method, "edit_onehop", None, None)
    done = s.store.done_keys()
    for index in _positions(s, indices):
        case = s.cases[index]
        facts = [p.onehop_edit for p in case.probes if p.onehop_edit is not None]
        if not facts or record_key({"run": run, "case_id": case.case_id}) in done:
            continue
        keep = [i for i, p in enumerate(case.probes) if p.kind == ProbeKind.PORTABILITY]
        port = EditCase(case.case_id, case.edit_type, case.edit, tuple(case.probes[i] for i in keep))
        pre = [s.pre[case.case_id][i] for i in keep]
        stack: list[tuple[Edited, dict]] = []
        try:
            stack.append(_apply(s, editor, case, index))
            for fact in facts:
                stack.append(
                    _apply(s, editor, EditCase(f"{case.case_id}/onehop", case.edit_type, fact, ()), index)
                )
            cost = {k: sum(c[k] for _, c in stack) for k in ("edit_seconds", "edited_params")}
            cost["peak_memory_mb"] = max(c["peak_memory_mb"] for _, c in stack)
            _score_and_record(s, run, stack[-1][0], port, index, cost, pre)
        except (EditCollapsed, MmkeError) as e:
            _failure_record(s, run, case, index, e)
        finally:
            _restore_all(stack)


def _restore_all(stack: list[tuple[Edited, dict]]) -> None:
    """Undo stacked edits newest first, which returns the model to its original weights exactly."""
    for edited, _ in reversed(stack):
        edited.restore()


# --- the whole run ------------------------------------------------------------------------


def planned_records(cfg: RunConfig, n: int) -> int:
    """How many case records a run of ``n`` cases writes in all (the progress bar's total)."""
    per_method = {
        "single": n,
        "edit_onehop": n,
        "sequential": sum(max(0, n - g) for g in cfg.gaps),
        "lifelong": sum(min(c, n) for c in {*cfg.checkpoints, n} if c <= n),
    }[cfg.protocol]
    return per_method * len(cfg.methods)


#: A model directory may recommend method settings for itself (e.g. FT's lr for the world model).
PRESETS_FILE = "mmke_methods.yaml"


def method_options(source: Path | None, cfg: RunConfig, method: str) -> dict[str, Any]:
    """The recommended settings for ``method`` of the model saved at ``source``, overridden by the user's."""
    import yaml

    presets: dict[str, Any] = {}
    if source is not None and (source / PRESETS_FILE).is_file():
        presets = yaml.safe_load((source / PRESETS_FILE).read_text()) or {}
    return {**presets.get(method, {}), **cfg.method_options.get(method, {})}


def editor_for(s: Session, method: str) -> Editor:
    """The session's editor for ``method``: built (and trained, if it needs the train split) once."""
    from mmke.registry import methods

    if method not in s.editors:
        editor = methods.get(method)(method_options(s.model.source, s.cfg, method))
        if editor.needs_train_cases:
            editor.train(s.model, s.bench.train_cases, s.images)
        s.editors[method] = editor
    return s.editors[method]


def run_method(
    s: Session, method: str, indices: Sequence[int] | None = None, gaps: Sequence[int] | None = None
) -> None:
    """Walk the configured protocol with ``method``: over ``indices`` (single, edit-one-hop; default
    every case) or the streams of ``gaps`` (sequential; default the configured ones)."""
    editor = editor_for(s, method)
    if s.cfg.protocol == "single":
        run_single(s, editor, method, indices)
    elif s.cfg.protocol == "sequential":
        for gap in s.cfg.gaps if gaps is None else gaps:
            if gap < len(s.cases):
                run_sequential(s, editor, method, gap)
    elif s.cfg.protocol == "lifelong":
        run_lifelong(s, editor, method)
    else:
        run_edit_onehop(s, editor, method, indices)


def open_benchmark(cfg: RunConfig) -> Benchmark:
    """The configured benchmark with its reader options; bad records stop it unless ``skip_bad``."""
    from mmke.data.benchmark import load_benchmark

    root = Path(cfg.image_root) if cfg.image_root else None
    return load_benchmark(cfg.benchmark, root, skip_bad=cfg.skip_bad, options=cfg.benchmark_options)


def open_cases(cfg: RunConfig, bench: Benchmark | None = None) -> tuple[Benchmark, tuple[EditCase, ...]]:
    """The benchmark (read unless given) and the run's selection of its cases; none is an error."""
    bench = open_benchmark(cfg) if bench is None else bench
    cases = select_cases(bench.cases, cfg.limit, cfg.edit_types)
    if not cases:
        why = f"; {len(bench.skipped)} bad record(s) skipped" if bench.skipped else ""
        raise BadRecordError(f"benchmark {cfg.benchmark}: no cases to run{why}")
    return bench, cases


def note_skipped(store: RunStore, bench: Benchmark) -> None:
    if bench.skipped:
        store.write_skipped(bench.skipped)
        log.warning("skipped %d bad record(s) (listed in %s/skipped.jsonl)", len(bench.skipped), store.path)


def open_session(
    cfg: RunConfig,
    store: Sink,
    progress: Progress | None = None,
    *,
    score_all: bool = True,
    bench: Benchmark | None = None,
) -> Session:
    """Load the model and benchmark (unless given) once and (``score_all``) score the unedited
    model on every probe.

    A worker that runs only some cases passes ``score_all=False`` and scores them as it meets them.
    """
    bench, cases = open_cases(cfg, bench)
    model = LVLM.load(cfg.model, dtype=cfg.dtype, device=cfg.device, allow_pickle=cfg.allow_pickle)
    images = ImageStore(bench.image_root) if bench.image_root is not None else None
    s = Session(cfg, model, cfg.model, bench, cases, images, store, {}, progress)
    if score_all:
        s.ensure_pre(range(len(cases)))
    s.planned = planned_records(cfg, len(cases))
    return s


def preflight(cfg: RunConfig) -> Benchmark:
    """Check everything a run can check without loading its model, before anything is created,
    loaded or edited: component names, every method's options, the device, the model folder's
    config and the benchmark's records. Returns the benchmark, read once for the run."""
    from mmke.methods.base import make_config
    from mmke.models._loading import check_device, read_config
    from mmke.registry import benchmarks, methods

    benchmarks.get(cfg.benchmark.partition(":")[0])
    source = model_dir(cfg.model)
    # options of methods not run are checked too: method_options.ft_lm.steps=5 is a typo, not a no-op
    for method in dict.fromkeys([*cfg.methods, *cfg.method_options]):
        editor = methods.get(method)
        make_config(editor.defaults, method_options(source, cfg, method), method)
    path = bundled_or_path(cfg.model)
    check_device(cfg.device, path)
    read_config(path)
    if cfg.image_root is not None and not Path(cfg.image_root).is_dir():
        raise ConfigError(f"image_root={cfg.image_root!r} is not a directory")
    return open_cases(cfg)[0]


def model_dir(name: str) -> Path | None:
    """The directory a run's model loads from, when it is one (not e.g. a family's tiny model)."""
    try:
        path = bundled_or_path(name)
    except MmkeError:
        return None
    return path if path.is_dir() else None


def run_in_session(s: Session) -> dict[str, str]:
    """Every configured method in this process; returns the methods that could not run, and why."""
    not_run: dict[str, str] = {}
    for method in s.cfg.methods:
        try:
            run_method(s, method)
        except EditorNotReadyError as e:  # e.g. IKE without a train split: the other methods still run
            log.warning("%s not run: %s", method, e)
            not_run[method] = str(e)
    return not_run


def run(
    cfg: RunConfig,
    store: RunStore,
    progress: Progress | None = None,
    executor: Executor | None = None,
    bench: Benchmark | None = None,
) -> dict:
    """Run every configured method on the configured protocol; returns (and stores) the summary.

    ``executor`` says where the work happens (default: in this process; see ``mmke.eval.executors``);
    ``bench`` is ``preflight``'s benchmark (checked and read here when not given).
    """
    from mmke.eval.executors import InProcess
    from mmke.eval.metrics import summarize

    bench = preflight(cfg) if bench is None else bench
    bench, not_run = (executor or InProcess()).run(cfg, store, progress, bench)
    run_info = {
        "config": cfg.to_dict(),
        "config_hash": store.config_hash,
        "method_options": {m: method_options(model_dir(cfg.model), cfg, m) for m in cfg.methods},
        "not_run": not_run,
        "skipped_records": len(bench.skipped),
    }
    summary = summarize(store.records(), run_info)
    store.write_summary(summary)
    return summary
