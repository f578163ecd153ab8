"""The runner: score the unedited model once, then for each method walk the protocol's episodes.

``score_pre → apply → score_post → restore → record``, with every probe of a case (and, for the
pre-edit pass, of all cases) batched into few forward passes. One loop (``walk``) runs every
protocol: what differs between them is only their schedule (``mmke.eval.protocols``). Each
finished case is appended to the run store at once, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from mmke.cache import cache_dir
from mmke.config import RunConfig
from mmke.data.benchmark import Benchmark
from mmke.data.images import ImageStore
from mmke.errors import BadRecordError, MmkeError
from mmke.eval._efficiency import measure
from mmke.eval.answers import first_answer
from mmke.eval.judge import Judge, Question, judge_from_config
from mmke.eval.metrics import CaseScores, behavioural_collapse, score_case
from mmke.eval.protocols import Check, Episode, Step, protocol_named
from mmke.eval.protocols import Protocol as EditProtocol
from mmke.eval.records import CaseRecord, EditText, Provenance, ResumeKey, RunBlock
from mmke.eval.store import RunStore
from mmke.methods.base import EditCollapsed, Edited, Editor, EditorNotReadyError
from mmke.methods.hparams import KEY as HPARAMS_KEY
from mmke.methods.hparams import Hparams, expand
from mmke.models import LVLM
from mmke.models._loading import bundled_or_path
from mmke.models.layout import Layout
from mmke.models.scoring import ItemScore, Scorer, scorer_named
from mmke.types import LOCALITY_KINDS, EditCase, Probe

log = logging.getLogger(__name__)

#: Called after each recorded case: (cases recorded so far, total planned, method name).
Progress = Callable[[int, int, str], None]


class Sink(Protocol):
    """Where finished case records go: the run store itself, or a worker's line back to it."""

    config_hash: str

    def append(self, record: CaseRecord) -> None: ...

    def done_keys(self) -> set[ResumeKey]: ...


@dataclass
class Session:
    """What one run (or one worker) holds for its whole length: model, cases, pre-edit scores, sink,
    and the protocol and scorer the config names."""

    cfg: RunConfig
    model: LVLM
    model_name: str
    bench: Benchmark
    cases: tuple[EditCase, ...]
    store: Sink
    pre: dict[str, list[ItemScore]]
    progress: Progress | None = None
    recorded: int = 0
    planned: int = 0
    editors: dict[str, Editor] = field(default_factory=dict)
    #: The unedited model's free answers to every probe, by case (when the run generates).
    pre_gen: dict[str, list[str]] = field(default_factory=dict)
    protocol: EditProtocol = field(init=False)
    scorer: Scorer = field(init=False)
    judge: Judge | None = field(init=False)

    def __post_init__(self) -> None:
        self.protocol = protocol_named(self.cfg.protocol)
        self.scorer = scorer_named(self.cfg.scoring)
        self.model.bind_scorer(self.scorer)
        self.planned = self.protocol.planned(self.cfg, len(self.cases))
        self.judge = judge_for(self.cfg)

    @property
    def generates(self) -> bool:
        return "generation" in self.cfg.evaluation

    def emulating(self, name: str, method: str) -> bool:
        """Whether the config asks to re-enact the scorer's known bug ``name`` and it touches ``method``."""
        bug = self.scorer.emulations.get(name)
        return name in self.cfg.emulate and bug is not None and (not bug.methods or method in bug.methods)

    def provenance(self, method: str, editor: Editor) -> Provenance:
        """The definitions behind ``method``'s results in this session (recorded on each of them)."""
        sc, family = self.scorer, self.model.family.name
        emulate = tuple(e for e in self.cfg.emulate if self.emulating(e, method))
        return Provenance(
            protocol=sc.name,
            version=sc.version,
            scorer=self.model.prompt_format.labels,
            prompt_format=f"{family}: {self.model.prompt_format.describe}",
            locality=sc.locality_rule(editor.in_context),
            averaging=sc.averaging(method),
            emulate=emulate,
            comparable_group=sc.comparable_group(family, emulate),
        )

    def ensure_pre(self, indices: Sequence[int]) -> None:
        """Score the unedited model on those of these cases it has not scored yet (one batched pass)."""
        missing = [self.cases[i] for i in indices if self.cases[i].case_id not in self.pre]
        if missing:
            torch.manual_seed(self.cfg.seed)
            self.pre.update(score_pre(self.model, missing, self.cfg.batch_size))
            if self.generates:
                self.pre_gen.update(generate_pre(self.model, missing, self.cfg))


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


def score_pre(model: LVLM, cases: Sequence[EditCase], batch_size: int) -> dict[str, list[ItemScore]]:
    """Every probe of every case on the unedited model, in one batched pass (reused by all methods)."""
    scored = list(model.score([p for c in cases for p in c.probes], batch_size=batch_size))
    return _by_case(cases, scored)


def generate_pre(model: LVLM, cases: Sequence[EditCase], cfg: RunConfig) -> dict[str, list[str]]:
    """The unedited model's free answer to every probe of every case (generation locality compares
    the edited model's answers with these), in one batched pass."""
    probes = [p for c in cases for p in c.probes]
    return _by_case(
        cases, model.generate(probes, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    )


def _by_case(cases: Sequence[EditCase], flat: list[Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    start = 0
    for c in cases:
        out[c.case_id] = flat[start : start + len(c.probes)]
        start += len(c.probes)
    return out


def judge_for(cfg: RunConfig) -> Judge | None:
    """The run's judge (None unless ``evaluation`` includes judge); verdicts are cached on disk."""
    if "judge" not in cfg.evaluation or not cfg.judge:
        return None
    return judge_from_config(cfg.judge, cfg.judge_options, cache_dir())


# --- one case -----------------------------------------------------------------------------


def _run_block(s: Session, method: str, step: Step, provenance: Provenance) -> RunBlock:
    return RunBlock(
        model=s.model_name,
        method=method,
        benchmark=s.bench.name,
        benchmark_version=s.bench.version,
        protocol=s.protocol.name,
        gap=step.gap,
        checkpoint=step.checkpoint,
        seed=s.cfg.seed,
        config_hash=s.store.config_hash,
        scoring=s.cfg.scoring,
        provenance=provenance,
    )


def _record(
    s: Session,
    run: RunBlock,
    case: EditCase,
    index: int,
    scored: CaseScores | None,
    cost: dict,
    failure: tuple | None = None,
) -> None:
    status, message, at = failure if failure else ("ok", None, None)
    edit = EditText(case.edit.prompt, case.edit.target, case.edit.ground_truth)
    parts = {} if scored is None else vars(scored)
    s.store.append(
        CaseRecord(
            run,
            case.case_id,
            case.edit_type.value,
            index,
            edit,
            status,
            message,
            at,
            cost,
            **parts,
            task=case.task,
        )
    )
    s.recorded += 1
    if s.progress is not None:
        s.progress(s.recorded, s.planned, run.method or "")


def _score_and_record(
    s: Session,
    run: RunBlock,
    edited: Edited,
    case: EditCase,
    index: int,
    cost: dict,
    pre: list[ItemScore],
    in_context: bool,
    pre_gen: list[str] | None = None,
) -> bool:
    """Score one case through ``edited`` and append its record; False when the model collapsed."""
    with measure(s.model.device) as m:
        post = list(edited.score(case.probes, batch_size=s.cfg.batch_size))
        finite = all(math.isfinite(x.nll) for x in post)
        gens = None
        if s.generates and finite:
            gens = edited.generate(
                case.probes, max_new_tokens=s.cfg.max_new_tokens, batch_size=s.cfg.batch_size
            )
    cost = cost | {"score_seconds": m.seconds}
    if not finite:
        _record(
            s,
            run,
            case,
            index,
            None,
            cost,
            ("collapsed", "non-finite logits (NaN/inf) after the edit", index),
        )
        return False
    if s.emulating("pre_after_edit", run.method or ""):
        pre = post  # EasyEdit's single-edit "pre" pass runs on the model the edit changed in place
    verdicts = None
    if s.judge is not None and gens is not None:
        with measure(s.model.device) as m:
            verdicts = s.judge.judge(judge_questions(case.probes, gens, pre_gen))
        cost = cost | {"judge_seconds": m.seconds}
    scored = score_case(case.probes, post, pre, s.scorer, gens, in_context, pre_gen, verdicts)
    if s.protocol.stream and behavioural_collapse(scored.metrics):
        why = f"behavioural collapse after edit {index}: every probe scores 0 (weights are finite)"
        _record(s, run, case, index, scored, cost, ("collapsed", why, index))
        return False
    _record(s, run, case, index, scored, cost)
    return True


def _apply(
    s: Session,
    editor: Editor,
    writes: Sequence[EditCase],
    index: int,
    stack: list[Edited],
    together: bool = False,
) -> tuple[Edited, dict]:
    """Apply ``writes`` (what editing one case writes) under the run's seed (per stream position, so
    a resumed run matches), pushing each handle on ``stack``; returns the last handle and the summed cost.

    ``together``: all of ``writes`` in one update (``apply_many``, one handle).
    """
    costs = []
    for group in [writes] if together else [[w] for w in writes]:
        torch.manual_seed(s.cfg.seed * 1_000_003 + index)
        with measure(s.model.device) as m:
            stack.append(editor.apply_many(s.model, group) if together else editor.apply(s.model, group[0]))
        costs.append(
            {"edit_seconds": m.seconds, "peak_memory_mb": m.peak_mb, "edited_params": stack[-1].edited_params}
        )
    cost = {k: sum(c[k] for c in costs) for k in ("edit_seconds", "edited_params")}
    cost["peak_memory_mb"] = max(c["peak_memory_mb"] for c in costs)
    return stack[-1], cost


def _failure_record(s: Session, run: RunBlock, case: EditCase, index: int, e: Exception) -> None:
    status = "collapsed" if isinstance(e, EditCollapsed) else "error"
    at = index if isinstance(e, EditCollapsed) else None
    log.warning("%s %s: %s", run.method, case.case_id, e)
    _record(s, run, case, index, None, {}, (status, f"{type(e).__name__}: {e}", at))


# --- the walk -----------------------------------------------------------------------------


def walk(s: Session, editor: Editor, method: str, episode: Episode, done: set[ResumeKey]) -> None:
    """Walk one episode of the protocol: edit, score, and restore everything at the end.

    Cases in ``done`` (already recorded) are not scored again, but their edits are replayed (later
    ones build on them); an edit that fails is recorded and ends the episode, and so does a
    collapsed model.
    """
    todo = [(step, c) for step in episode.steps for c in step.checks]
    if all(_key(s, method, step, c) in done for step, c in todo):
        return
    stack: list[Edited] = []
    applied: list[tuple[Edited, dict]] = []
    provenance = s.provenance(method, editor)
    stale: dict[int, list[ItemScore]] = {}
    try:
        for step in episode.steps:
            run = _run_block(s, method, step, provenance)
            if step.edit is not None:
                case = s.cases[step.edit]
                writes = [w for i in step.edits for w in s.protocol.writes(s.cases[i])]
                if not writes:
                    return
                if step.edit > 0 and s.emulating("ft_stale_pre", method):
                    stale[step.edit] = _stale_pre(s, editor, step.edit)
                # a prompt method's handle holds only the facts written through it, so a case's
                # companion or one-hop fact goes into the same context as its edit
                together = bool(step.together) or (editor.in_context and len(writes) > 1)
                try:
                    applied.append(_apply(s, editor, writes, step.edit, stack, together))
                except EditorNotReadyError:
                    raise  # the method cannot run at all (no usable train split): not this case's failure
                except (EditCollapsed, MmkeError) as e:
                    _failure_record(s, run, case, step.edit, e)
                    return
            for check in step.checks:
                if _key(s, method, step, check) in done:
                    continue
                edited, cost = applied[check.through]
                case, pre, pre_gen = _scored_part(s, s.cases[check.case], stale.get(check.case))
                if not _score_and_record(
                    s, run, edited, case, check.at, cost, pre, editor.in_context, pre_gen
                ):
                    return
    finally:
        for edited in reversed(stack):  # newest first: back to the original weights exactly
            edited.restore()


def _key(s: Session, method: str, step: Step, check: Check) -> ResumeKey:
    return (method, s.protocol.name, step.gap, step.checkpoint, s.cases[check.case].case_id)


def _stale_pre(s: Session, editor: Editor, index: int) -> list[ItemScore]:
    """VLKEB FT's pre-edit scores of case ``index``: its locality probes on the model still holding
    the previous case's edit (applied again here under that case's seed, then undone)."""
    case, pre = s.cases[index], list(s.pre[s.cases[index].case_id])
    where = [i for i, p in enumerate(case.probes) if p.kind in LOCALITY_KINDS]
    stack: list[Edited] = []
    try:
        edited, _ = _apply(s, editor, s.protocol.writes(s.cases[index - 1]), index - 1, stack)
        scored = edited.score([case.probes[i] for i in where], batch_size=s.cfg.batch_size)
    except (EditCollapsed, MmkeError) as e:  # no edit was left behind to go stale: pre is clean
        log.warning("%s %s: ft_stale_pre: the previous edit failed (%s)", editor.name, case.case_id, e)
        return pre
    finally:
        for handle in reversed(stack):
            handle.restore()
    for i, score in zip(where, scored, strict=True):
        pre[i] = score
    return pre


def _scored_part(
    s: Session, case: EditCase, pre_scores: list[ItemScore] | None = None
) -> tuple[EditCase, list[ItemScore], list[str] | None]:
    """The case with only the probes the protocol scores, their pre-edit scores (the session's
    unless ``pre_scores`` stands in for them) and the unedited model's answers to them."""
    keep = s.protocol.scored(case)
    pre = s.pre[case.case_id] if pre_scores is None else pre_scores
    pre_gen = s.pre_gen.get(case.case_id)
    if keep is None:
        return case, pre, pre_gen
    probes = tuple(case.probes[i] for i in keep)
    part = replace(case, probes=probes)
    return part, [pre[i] for i in keep], None if pre_gen is None else [pre_gen[i] for i in keep]


def judge_questions(
    probes: Sequence[Probe], generated: Sequence[str], pre_generated: Sequence[str] | None
) -> list[Question]:
    """What the judge is asked per probe: is the answer the target (CORRECT / INCORRECT), or, for
    locality, does it say what the unedited model said (SAME / DIFFERENT)."""
    out = []
    for i, (p, answer) in enumerate(zip(probes, generated, strict=True)):
        said = first_answer(answer)  # what the string match reads too
        if p.kind in LOCALITY_KINDS and pre_generated is not None:
            out.append(Question("compare", p.prompt, first_answer(pre_generated[i]), said))
        else:
            out.append(Question("grade", p.prompt, p.target, said, p.aliases))
    return out


# --- the whole run ------------------------------------------------------------------------


#: A model directory may recommend method settings for itself (e.g. FT's lr for the world model).
PRESETS_FILE = "mmke_methods.yaml"


def method_options(
    source: Path | None, cfg: RunConfig, method: str, layout: Layout | None = None
) -> dict[str, Any]:
    """The recommended settings for ``method`` of the model saved at ``source``, overridden by the user's.

    The user's ``hparams`` (an anchor's hparams file, ``mmke.methods.hparams``) is read in here, the
    one place options are resolved, between the presets and the user's other keys; with the loaded
    model's ``layout`` the file's layer indices are checked against it.
    """
    import yaml

    presets: dict[str, Any] = {}
    if source is not None and (source / PRESETS_FILE).is_file():
        presets = yaml.safe_load((source / PRESETS_FILE).read_text()) or {}
    user = cfg.method_options.get(method, {})
    options, hparams = expand(method, user)
    if hparams is not None and layout is not None:
        # a value equal to the file's came from it (``with_hparams`` wrote it out): check it too
        own = [k for k, v in user.items() if k not in hparams.options or hparams.options[k] != v]
        hparams.check_layers(layout, own)
    return {**presets.get(method, {}), **options}


def method_hparams(cfg: RunConfig, method: str) -> Hparams | None:
    """The anchor hparams file the user gave ``method``, as translated (None without one)."""
    return expand(method, cfg.method_options.get(method, {}))[1]


def with_hparams(cfg: RunConfig) -> RunConfig:
    """``cfg`` with each method's anchor hparams file read into its options (the path kept beside
    them), so a run's ``config.yaml`` holds the values the file resolved to; resolving that again
    gives the same options."""
    resolved = {}
    for method, user in cfg.method_options.items():
        options, hparams = expand(method, user)
        resolved[method] = options if hparams is None else {**options, HPARAMS_KEY: user[HPARAMS_KEY]}
    return replace(cfg, method_options=resolved)


def editor_for(s: Session, method: str) -> Editor:
    """The session's editor for ``method``: built (and trained, if it needs the train split) once."""
    from mmke.registry import methods

    if method not in s.editors:
        editor = methods.get(method)(method_options(s.model.source, s.cfg, method, s.model.layout))
        if editor.needs_train_cases:
            editor.train(s.model, s.bench.train_cases)
        s.editors[method] = editor
    return s.editors[method]


def run_method(s: Session, method: str, episodes: Sequence[int] | None = None) -> None:
    """Walk the protocol's episodes (those at ``episodes``; default every one) with ``method``."""
    editor = editor_for(s, method)
    every = s.protocol.episodes(s.cfg, len(s.cases))
    done = s.store.done_keys()
    for e in range(len(every)) if episodes is None else episodes:
        walk(s, editor, method, every[e], done)


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


def benchmark_images(bench: Benchmark) -> ImageStore | None:
    """The store a model opens the benchmark's images from (None for a benchmark without images)."""
    return ImageStore(bench.image_root) if bench.image_root is not None else None


def open_session(
    cfg: RunConfig,
    store: Sink,
    progress: Progress | None = None,
    *,
    score_all: bool = True,
    bench: Benchmark | None = None,
) -> Session:
    """Load the model and benchmark (unless given) once, the model bound to the benchmark's images,
    and (``score_all``) score the unedited model on every probe.

    A worker that runs only some cases passes ``score_all=False`` and scores them as it meets them.
    """
    bench, cases = open_cases(cfg, bench)
    model = LVLM.load(
        cfg.model,
        dtype=cfg.dtype,
        device=cfg.device,
        allow_pickle=cfg.allow_pickle,
        trust_remote_code=cfg.trust_remote_code,
        images=benchmark_images(bench),
    )
    s = Session(cfg, model, cfg.model, bench, cases, store, {}, progress)
    if score_all:
        s.ensure_pre(range(len(cases)))
    return s


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
