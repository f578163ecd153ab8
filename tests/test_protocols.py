"""Protocol schedules: when each case is edited and when it is scored."""

from __future__ import annotations

import pytest

from mmke.eval import protocols


def test_single_scores_each_case_right_after_its_edit() -> None:
    assert [(s.edit, s.score) for s in protocols.single(3)] == [(0, (0,)), (1, (1,)), (2, (2,))]


def test_sequential_gap_scores_case_s_minus_gap_after_edit_s() -> None:
    steps = protocols.sequential(5, gap=2)
    assert [(s.edit, s.score) for s in steps] == [(0, ()), (1, ()), (2, (0,)), (3, (1,)), (4, (2,))]
    # N + g edits for N scored cases
    scored = [i for s in protocols.sequential(30, gap=10) for i in s.score]
    assert scored == list(range(20))


def test_sequential_gap_zero_is_single_without_restore() -> None:
    assert [s.score for s in protocols.sequential(3, 0)] == [(0,), (1,), (2,)]
    with pytest.raises(ValueError):
        protocols.sequential(3, -1)


def test_lifelong_scores_everything_so_far_at_checkpoints_and_the_end() -> None:
    steps = protocols.lifelong(5, (2, 10))
    assert [s.score for s in steps] == [(), (0, 1), (), (), (0, 1, 2, 3, 4)]
    assert protocols.lifelong(0, (2,)) == []
