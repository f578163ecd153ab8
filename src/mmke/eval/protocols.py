"""When each case is edited and when it is scored, per protocol — as pure schedules over stream indices.

The runner walks a schedule; keeping the timing here, apart from any model, is what lets the
tests pin down the semantics that the anchors leave ambiguous (EasyEdit#586: gap 0 vs after
all edits).
"""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOLS = ("single", "sequential", "lifelong", "edit_onehop")


@dataclass(frozen=True)
class Step:
    """Edit stream case ``edit`` (or none), then score the cases in ``score`` on the model as it stands."""

    edit: int | None
    score: tuple[int, ...] = ()


def single(n: int) -> list[Step]:
    """Edit case i, score case i, restore: every case on the unedited model."""
    return [Step(i, (i,)) for i in range(n)]


def sequential(n: int, gap: int) -> list[Step]:
    """VLKEB's sequential editing: after edit s (s >= gap) score case s - gap, never restoring between.

    ``n`` cases in the stream give ``n - gap`` scored cases (the last ``gap`` edits only age the
    earlier ones). Gap 0 is single editing without restores.
    """
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    return [Step(s, (s - gap,) if s >= gap else ()) for s in range(n)]


def lifelong(n: int, checkpoints: tuple[int, ...]) -> list[Step]:
    """Edit a stream of n cases; at each checkpoint c (and at the end) score all c cases edited so far."""
    marks = sorted({c for c in checkpoints if 0 < c < n} | {n}) if n else []
    steps: list[Step] = []
    for s in range(n):
        done = s + 1
        steps.append(Step(s, tuple(range(done)) if done in marks else ()))
    return steps
