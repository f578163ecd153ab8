"""Protocols: when each case is edited and when it is scored, the units executors hand out, the plan."""

from __future__ import annotations

import pytest

from mmke.config import RunConfig
from mmke.eval.protocols import EditOneHop, Episode, Lifelong, Sequential, Single, Unit, protocol_named
from mmke.registry import protocols
from mmke.types import EditCase, EditFact, EditType, Probe, ProbeKind


def schedule(episode: Episode) -> list[tuple[int | None, tuple[int, ...]]]:
    """(edited case, scored cases) per step."""
    return [(s.edit, tuple(c.case for c in s.checks)) for s in episode.steps]


def cfg(**kw: object) -> RunConfig:
    return RunConfig(methods=("ft_llm", "ike"), **kw).validate()  # type: ignore[arg-type]


def test_every_protocol_is_registered_in_the_papers_order() -> None:
    assert protocols.declared() == ["single", "sequential", "lifelong", "edit_onehop", "batch"]
    assert isinstance(protocol_named("sequential"), Sequential)


def test_single_scores_each_case_right_after_its_edit_and_restores() -> None:
    episodes = Single().episodes(cfg(), 3)
    assert [schedule(e) for e in episodes] == [[(0, (0,))], [(1, (1,))], [(2, (2,))]]
    assert [c.through for e in episodes for s in e.steps for c in s.checks] == [0, 0, 0]


def test_sequential_gap_scores_case_s_minus_gap_after_edit_s() -> None:
    stream = Sequential.stream_of(5, gap=2)
    assert schedule(stream) == [(0, ()), (1, ()), (2, (0,)), (3, (1,)), (4, (2,))]
    # the scored case goes through its own edit's handle; the record's index is the edit that aged it
    assert [(c.through, c.at) for s in stream.steps for c in s.checks] == [(0, 2), (1, 3), (2, 4)]
    assert {s.gap for s in stream.steps} == {2}
    # N + g edits for N scored cases
    assert [c.case for s in Sequential.stream_of(30, 10).steps for c in s.checks] == list(range(20))
    # one stream per gap below n
    assert len(Sequential().episodes(cfg(gaps=(1, 2, 50)), 5)) == 2


def test_sequential_gap_zero_is_single_without_restore() -> None:
    assert [scored for _, scored in schedule(Sequential.stream_of(3, 0))] == [(0,), (1,), (2,)]
    with pytest.raises(ValueError):
        Sequential.stream_of(3, -1)


def test_lifelong_scores_everything_so_far_at_checkpoints_and_the_end() -> None:
    stream = Lifelong.stream_of(5, (2, 10))
    assert [scored for _, scored in schedule(stream)] == [(), (0, 1), (), (), (0, 1, 2, 3, 4)]
    # a step's checkpoint is the number of edits made, so a failed edit is filed under it too
    assert [s.checkpoint for s in stream.steps] == [1, 2, 3, 4, 5]
    assert Lifelong().episodes(cfg(), 0) == []


def test_edit_onehop_writes_the_edit_then_its_facts_and_scores_portability_only() -> None:
    fact = EditFact("who founded it?", "Ada")
    probes = (
        Probe(ProbeKind.RELIABILITY, "q", "a"),
        Probe(ProbeKind.PORTABILITY, "p", "b", hop=1, onehop_edit=fact),
    )
    case = EditCase("c1", EditType.VISUAL_ENTITY, EditFact("q", "a"), probes)
    writes = EditOneHop().writes(case)
    assert [w.edit for w in writes] == [case.edit, fact] and writes[1].case_id == "c1/onehop"
    assert EditOneHop().scored(case) == (1,)
    assert EditOneHop().writes(EditCase("c2", EditType.VISUAL_ENTITY, EditFact("q", "a"), probes[:1])) == ()


@pytest.mark.parametrize(
    ("name", "kw", "n", "planned"),
    [
        ("single", {}, 7, 7),
        ("edit_onehop", {}, 7, 7),
        ("sequential", {"gaps": (2, 5, 10)}, 7, (7 - 2) + (7 - 5)),
        ("lifelong", {"checkpoints": (3, 10)}, 7, 3 + 7),
        ("batch", {"batch_edits": 3}, 7, 7),
    ],
)
def test_planned_records_count_every_scoring_of_every_method(
    name: str, kw: dict, n: int, planned: int
) -> None:
    assert protocol_named(name).planned(cfg(protocol=name, **kw), n) == 2 * planned


def test_units_chunk_single_cases_and_keep_streams_whole() -> None:
    units = Single().units(cfg(), 11, workers=2)
    per_method = [u.episodes for u in units if u.method == "ft_llm"]
    assert sorted(e for chunk in per_method for e in chunk) == list(range(11))  # every case once
    assert len(per_method) > 2  # more units than workers, so the last one is short
    streams = Sequential().units(cfg(protocol="sequential", gaps=(2, 5, 20)), 11, workers=2)
    assert streams == [Unit(m, (e,)) for m in ("ft_llm", "ike") for e in (0, 1)]
