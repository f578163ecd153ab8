"""Editing protocols as registered objects: when each case is edited and when it is scored.

A protocol cuts a run of ``n`` cases into episodes. An episode is a list of steps on one model
whose edits stack up and are all undone when it ends; a step edits one case (or none) and then
scores some cases on the model as it stands. The runner walks every episode with one loop
(resume, collapse and restore are handled there, once); executors hand out whole episodes as
work units; the planned record count is the number of scorings. Keeping the timing here, apart
from any model, is what lets the tests pin down the semantics that the anchors leave ambiguous
(EasyEdit#586: gap 0 vs after all edits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from mmke.config import RunConfig
from mmke.registry import register_protocol
from mmke.types import EditCase, EditFact, ProbeKind

#: Units per worker and method for protocols whose episodes are single cases: small enough that
#: methods of unequal cost (IKE's long prompts, SERAC's second pass) do not leave one worker idle
#: at the end and that a kill loses little. (8 rather than 4 shortens the last unit one worker may
#: wait on; the 60-case timing did not show a change beyond this machine's noise.)
UNITS_PER_WORKER = 8


@dataclass(frozen=True)
class Check:
    """Score case ``case`` through the handle of the episode's ``through``-th edit (whose cost
    its record carries); the record's ``index`` is ``at``."""

    case: int
    through: int
    at: int


@dataclass(frozen=True)
class Step:
    """Edit case ``edit`` (or none), then run ``checks``; records carry ``gap`` / ``checkpoint``.

    ``together``: further cases written in the same update as ``edit`` (the batch protocol: one
    ``apply_many`` call, one handle).
    """

    edit: int | None
    checks: tuple[Check, ...] = ()
    gap: int | None = None
    checkpoint: int | None = None
    together: tuple[int, ...] = ()

    @property
    def edits(self) -> tuple[int, ...]:
        """Every case this step writes, in order."""
        return () if self.edit is None else (self.edit, *self.together)


@dataclass(frozen=True)
class Episode:
    """Steps on one model whose edits build on each other; everything is restored after it."""

    steps: tuple[Step, ...]

    @property
    def cases(self) -> list[int]:
        """The cases it edits or scores, ascending (those whose pre-edit scores it needs)."""
        edited = {i for s in self.steps for i in s.edits}
        return sorted(edited | {c.case for s in self.steps for c in s.checks})


@dataclass(frozen=True)
class Unit:
    """One independent piece of a run for an executor: ``method`` on the protocol's episodes at
    ``episodes`` (positions in ``Protocol.episodes``; None: every one)."""

    method: str
    episodes: tuple[int, ...] | None = None


class Protocol:
    """An editing schedule. ``stream``: edits build on each other across cases, so a case whose
    every probe scores 0 is a behavioural collapse that ends the stream."""

    name: str = ""
    stream: bool = False

    def episodes(self, cfg: RunConfig, n: int) -> list[Episode]:
        raise NotImplementedError

    def writes(self, case: EditCase) -> tuple[EditCase, ...]:
        """The edits that editing ``case`` applies, in order (none: the case is not run): the case,
        then its companion facts (CCKEB writes the visual edit, then the textual one)."""
        return (case, *companion_writes(case))

    def scored(self, case: EditCase) -> tuple[int, ...] | None:
        """The positions of the probes of ``case`` that are scored (None: all)."""
        return None

    def units(self, cfg: RunConfig, n: int, workers: int) -> list[Unit]:
        """The run cut into units for ``workers`` workers: per-case episodes in chunks, streams whole."""
        count = len(self.episodes(cfg, n))
        units: list[Unit] = []
        for method in cfg.methods:
            if self.stream:
                units += [Unit(method, (e,)) for e in range(count)]
            else:
                size = max(1, math.ceil(count / (workers * UNITS_PER_WORKER)))
                units += [Unit(method, tuple(range(a, min(a + size, count)))) for a in range(0, count, size)]
        return units

    def planned(self, cfg: RunConfig, n: int) -> int:
        """How many case records a run of ``n`` cases writes in all (the progress bar's total)."""
        per_method = sum(len(s.checks) for e in self.episodes(cfg, n) for s in e.steps)
        return per_method * len(cfg.methods)


@register_protocol("single", help="edit one case, score it, restore: every case on the unedited model")
class Single(Protocol):
    name = "single"

    def episodes(self, cfg: RunConfig, n: int) -> list[Episode]:
        return [Episode((Step(i, (Check(i, 0, i),)),)) for i in range(n)]


@register_protocol("sequential", help="VLKEB: after edit s score case s - gap, never restoring (per gap)")
class Sequential(Protocol):
    """One stream per configured gap below ``n``: after edit s (s >= gap) score case s - gap.

    ``n`` cases in a stream give ``n - gap`` scored cases (the last ``gap`` edits only age the
    earlier ones). A stream is replayed from its start on resume (edits are deterministic per
    position). Gap 0 would be single editing without restores.
    """

    name = "sequential"
    stream = True

    def episodes(self, cfg: RunConfig, n: int) -> list[Episode]:
        return [self.stream_of(n, g) for g in cfg.gaps if g < n]

    @staticmethod
    def stream_of(n: int, gap: int) -> Episode:
        if gap < 0:
            raise ValueError(f"gap must be >= 0, got {gap}")
        # the scored case goes through its own edit's handle: for weight edits it is the same
        # model; for prompt methods (IKE) it is that fact's context, retrieved from memory
        return Episode(
            tuple(Step(s, (Check(s - gap, s - gap, s),) if s >= gap else (), gap=gap) for s in range(n))
        )


@register_protocol(
    "lifelong", help="edit the whole stream; at each checkpoint score every case edited so far"
)
class Lifelong(Protocol):
    """One stream of all ``n`` cases; at each checkpoint c < n and at the end, score all c cases
    edited so far, each through its own edit's handle."""

    name = "lifelong"
    stream = True

    def episodes(self, cfg: RunConfig, n: int) -> list[Episode]:
        return [self.stream_of(n, cfg.checkpoints)] if n else []

    @staticmethod
    def stream_of(n: int, checkpoints: Sequence[int]) -> Episode:
        marks = {c for c in checkpoints if 0 < c < n} | {n}
        steps = []
        for s in range(n):
            done = s + 1
            checks = tuple(Check(i, i, i) for i in range(done)) if done in marks else ()
            steps.append(Step(s, checks, checkpoint=done))
        return Episode(tuple(steps))


@register_protocol(
    "edit_onehop", help="VLKEB: write the edit and its one-hop fact, ask the portability questions"
)
class EditOneHop(Protocol):
    """Per case: write the edit, then each one-hop fact its portability probes name, and score only
    the portability probes through the last edit. A case without one-hop facts is not run."""

    name = "edit_onehop"

    def episodes(self, cfg: RunConfig, n: int) -> list[Episode]:
        return Single().episodes(cfg, n)

    def writes(self, case: EditCase) -> tuple[EditCase, ...]:
        facts: list[EditFact] = [p.onehop_edit for p in case.probes if p.onehop_edit is not None]
        if not facts:
            return ()
        hops = tuple(EditCase(f"{case.case_id}/onehop", case.edit_type, fact, ()) for fact in facts)
        return (*super().writes(case), *hops)

    def scored(self, case: EditCase) -> tuple[int, ...] | None:
        return tuple(i for i, p in enumerate(case.probes) if p.kind == ProbeKind.PORTABILITY)


@register_protocol(
    "batch", help="MEMIT's setting: write batch_edits cases in one update, score each, restore"
)
class BatchEdit(Protocol):
    """Cases in consecutive batches of ``batch_edits``: each batch is written in ONE update
    (``Editor.apply_many``), every case of it is scored through that update, then it is restored.

    A record's ``checkpoint`` is the number of edits its batch wrote (the last batch may be
    smaller when ``n`` is not a multiple). A method that cannot write several edits in one update
    is refused before the run starts rather than run as a loop of single edits.
    """

    name = "batch"

    def episodes(self, cfg: RunConfig, n: int) -> list[Episode]:
        size = cfg.batch_edits
        out = []
        for first in range(0, n, size):
            cases = tuple(range(first, min(first + size, n)))
            checks = tuple(Check(i, 0, i) for i in cases)
            out.append(Episode((Step(first, checks, checkpoint=len(cases), together=cases[1:]),)))
        return out


def companion_writes(case: EditCase) -> tuple[EditCase, ...]:
    """A case's companion facts as edits of their own (no probes: the case's probes measure them)."""
    return tuple(
        EditCase(f"{case.case_id}/companion{i}", case.edit_type, fact, ())
        for i, fact in enumerate(case.companions, start=1)
    )


def protocol_named(name: str) -> Protocol:
    from mmke.registry import protocols

    return protocols.get(name)()
