"""The runner end to end on a small world and a tiny model: exactness, resume, collapse, determinism."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _runs import small_overrides, small_run, without_timings
from mmke.cli import main
from mmke.eval.store import RunStore

Setup = tuple[Path, Path]  # (world dir, model dir): the `setup` fixture in conftest.py


def test_noop_keeps_locality_at_one_and_reliability_at_base(setup: Setup, tmp_path: Path) -> None:
    _store, summary = small_run(setup, tmp_path, "methods=[noop]")
    group = next(g for g in summary.groups if g.edit_type == "all" and g.task is None)
    assert group.metrics["text_locality"] == 1.0
    assert group.metrics["image_locality"] == 1.0
    assert group.metrics["reliability"] == group.base["reliability"]
    assert group.n_cases == 6


def test_single_ft_records_every_case_and_restores_the_model(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    store, _summary = small_run(setup, tmp_path, "methods=[ft_llm]")
    records = store.records()
    assert len(records) == 6 and all(r.status == "ok" for r in records)
    assert {r.edit_type for r in records} >= {"visual_entity", "medical_mcq"}
    eff = records[0].efficiency
    assert eff["edited_params"] > 0 and eff["edit_seconds"] > 0 and eff["peak_memory_mb"] > 0
    assert (store.path / "summary.json").is_file()


def test_same_seed_gives_identical_records_apart_from_timings(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    a, _ = small_run(setup, tmp_path, "methods=[ft_llm]")
    b, _ = small_run(setup, tmp_path, "methods=[ft_llm]")
    assert a.path != b.path
    assert without_timings(a.records()) == without_timings(b.records())


def test_sequential_records_n_minus_gap_cases(setup: Setup, tmp_path: Path) -> None:
    # noop: on this untrained model a few stacked FT edits leave every probe at 0, which is
    # (rightly) recorded as a behavioural collapse and would stop the stream early
    store, _ = small_run(setup, tmp_path, "methods=[noop]", "protocol=sequential", "gaps=[2,4]")
    by_gap: dict[int, list[dict]] = {}
    for r in store.records():
        by_gap.setdefault(r.run.gap, []).append(r)
    assert {g: len(rs) for g, rs in by_gap.items()} == {2: 4, 4: 2}
    # case s - gap is scored at stream position s
    assert [r.index for r in by_gap[2]] == [2, 3, 4, 5]


def test_nan_logits_are_recorded_as_collapse_and_the_run_goes_on(
    setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmke.models.base import LVLM

    real = LVLM.logits
    calls = {"n": 0}

    def poisoned(self: LVLM, batch, answer_only: bool = True):  # type: ignore[no-untyped-def]
        out = real(self, batch, answer_only)
        calls["n"] += 1
        return torch.full_like(out, float("nan")) if calls["n"] == 3 else out

    monkeypatch.setattr(LVLM, "logits", poisoned)
    store, summary = small_run(setup, tmp_path, "methods=[noop]", "batch_size=64")
    statuses = [r.status for r in store.records()]
    assert statuses.count("collapsed") == 1 and len(statuses) == 6
    collapsed = next(r for r in store.records() if r.status == "collapsed")
    assert collapsed.collapsed_at == collapsed.index and "NaN" in collapsed.message
    assert next(g for g in summary.groups if g.edit_type == "all" and g.task is None).n_collapsed == 1


def test_a_model_that_answers_nothing_is_recorded_as_collapsed_in_a_stream(
    setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finite weights, degenerate answers (VLKEB's MEND after a few edits): collapsed, stream stops."""
    from mmke.models.base import LVLM

    real = LVLM.logits
    calls = {"n": 0}

    def degenerate(self: LVLM, batch, answer_only: bool = True):  # type: ignore[no-untyped-def]
        out = real(self, batch, answer_only)
        calls["n"] += 1
        if calls["n"] <= 4:  # the pre-edit pass and the first scored cases stay healthy
            return out
        flat = torch.zeros_like(out)
        flat[..., 0] = 1.0  # every position predicts token 0 (padding): finite, and wrong everywhere
        return flat

    monkeypatch.setattr(LVLM, "logits", degenerate)
    store, summary = small_run(setup, tmp_path, "methods=[noop]", "protocol=sequential", "gaps=[1]")
    records = store.records()
    assert [r.status for r in records][-1] == "collapsed"
    assert all(r.status == "ok" for r in records[:-1]) and len(records) < 5  # the stream stopped
    last = records[-1]
    assert "behavioural collapse after edit" in last.message and last.collapsed_at == last.index
    assert all(v == 0.0 for v in last.metrics.values())  # kept, so the collapse can be inspected
    assert next(g for g in summary.groups if g.edit_type == "all" and g.task is None).n_collapsed == 1


def test_behavioural_collapse_needs_locality_and_all_zero() -> None:
    from mmke.eval.metrics import behavioural_collapse

    assert behavioural_collapse({"reliability": 0.0, "text_locality": 0.0, "image_locality": 0.0})
    assert not behavioural_collapse({"reliability": 0.0, "text_locality": 0.1})
    assert not behavioural_collapse({"reliability": 0.0, "portability": 0.0})  # no locality probe


def test_sigkill_then_resume_gives_the_uninterrupted_summary(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    _, clean = small_run(setup, tmp_path / "clean", "methods=[ft_llm,noop]")
    args = [*small_overrides(setup, tmp_path / "killed", "methods=[ft_llm,noop]"), "--run-id", "r"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmke.cli", "run", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    cases = tmp_path / "killed" / "r" / "cases.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not cases.exists() or cases.read_text().count("\n") < 3):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = cases.read_text().count("\n")
    assert 3 <= written < 12, "the kill must land mid-run"
    assert main(["run", "--resume", str(tmp_path / "killed" / "r")]) == 0
    records = RunStore.open(tmp_path / "killed" / "r").records()
    keys = [(r.run.method, r.case_id) for r in records]
    assert len(keys) == len(set(keys)) == 12
    resumed = json.loads((tmp_path / "killed" / "r" / "summary.json").read_text())
    strip = lambda s: [{k: v for k, v in g.items() if k != "efficiency"} for g in s["groups"]]  # noqa: E731
    assert strip(resumed) == strip(clean.to_dict())


def test_bad_config_and_unknown_method_are_one_line(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", *small_overrides(setup, tmp_path, "limt=5")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "limt" in err and "limit" in err
    assert main(["run", *small_overrides(setup, tmp_path, "methods=[fft]")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown method 'fft'" in err


def test_generation_keeps_raw_text_a_match_and_pre_answers_for_locality(setup: Setup, tmp_path: Path) -> None:
    store, summary = small_run(setup, tmp_path, "methods=[noop]", "limit=2", "max_new_tokens=6")
    records = store.records()
    probes = [p for r in records for p in r.probes]
    assert probes and all(isinstance(p.generated, str) for p in probes)
    assert all(p.generated_match in (0.0, 1.0) for p in probes)
    local = [p for p in probes if p.kind in ("text_locality", "image_locality")]
    # noop: the edited model is the unedited one, so its answers are the pre-edit answers
    assert local and all(p.pre_generated == p.generated and p.generated_match == 1.0 for p in local)
    assert all(r.generated and r.base_generated for r in records)
    (noop,) = [g for g in summary.groups if g.method == "noop" and g.edit_type == "all" and g.task is None]
    assert noop.generated["text_locality"] == 1.0
    assert noop.generated["reliability"] == noop.base_generated["reliability"]


def test_report_and_compare_commands(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, _ = small_run(setup, tmp_path, "methods=[noop]", "limit=2")
    b, _ = small_run(setup, tmp_path, "methods=[ft_llm]", "limit=2")
    assert main(["report", str(a.path)]) == 0
    assert (a.path / "report.html").is_file() and (a.path / "tables").is_dir()
    assert main(["compare", str(a.path), str(b.path)]) == 0
    assert "Δ" in capsys.readouterr().out


def test_vlkeb_scoring_runs_end_to_end(setup: Setup, tmp_path: Path) -> None:
    # ike k=0 prefixes its fact to every prompt, so post sequences are longer than pre ones
    args = ("methods=[noop,ike]", "method_options.ike.k=0", "scoring=vlkeb", "limit=3")
    store, summary = small_run(setup, tmp_path, *args)
    records = store.records()
    assert len(records) == 6 and all(r.status == "ok" for r in records)
    assert all(r.run.scoring == "vlkeb" for r in records)
    assert summary.run.config["scoring"] == "vlkeb"
    groups = {g.method: g for g in summary.groups if g.edit_type == "all" and g.task is None}
    for group in groups.values():
        assert group.metrics and all(math.isfinite(v) for v in group.metrics.values())
    assert groups["noop"].metrics["text_locality"] == 1.0
    assert groups["noop"].metrics["image_locality"] == 1.0
    assert groups["ike"].metrics["text_locality"] < 1.0  # the prefix moves the shared tail
