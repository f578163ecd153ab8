"""Executors: local worker processes and Ray give the single-process run's records and summary."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from _runs import small_overrides, small_run, without_timings
from mmke.cli import main
from mmke.config import RunConfig, load_config
from mmke.errors import ConfigError
from mmke.eval.executors import LocalWorkers, RayWorkers, executor_for
from mmke.eval.job import run
from mmke.eval.protocols import protocol_named
from mmke.eval.records import CaseRecord, RunSummary
from mmke.eval.store import RunStore

Setup = tuple[Path, Path]


def _same(a: object, b: object, where: str = "") -> None:
    """Equal, with floats to 1e-5: one process and a worker may use different torch thread
    counts, which move the last bits of an NLL (metrics from argmax tokens do not move)."""
    if isinstance(a, float) and isinstance(b, float):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5), where
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple) and isinstance(b, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _metrics(summary: RunSummary) -> list[dict]:
    return [{k: v for k, v in g.to_dict().items() if k != "efficiency"} for g in summary.groups]


def _by_key(records: list[CaseRecord]) -> list[dict]:
    """Records in a fixed order, without timings or the config hash (the runs' ``out`` differs)."""
    out = [
        r | {"run": {k: v for k, v in r["run"].items() if k != "config_hash"}}
        for r in without_timings(records)
    ]
    return sorted(out, key=lambda r: (repr(sorted(r["run"].items())), r["case_id"]))


@pytest.mark.parametrize("protocol", ["single", "sequential", "lifelong", "edit_onehop"])
def test_units_cover_every_case_of_every_method_once(protocol: str) -> None:
    cfg = RunConfig(methods=("ft_llm", "ike", "noop"), protocol=protocol, gaps=(2, 5, 50))
    proto = protocol_named(protocol)
    units = proto.units(cfg, 11, workers=2)
    episodes = proto.episodes(cfg, 11)
    for method in cfg.methods:
        mine = [u for u in units if u.method == method]
        assert sorted(e for u in mine for e in u.episodes or ()) == list(range(len(episodes)))
        if protocol in ("single", "edit_onehop"):
            assert len(episodes) == 11 and len(mine) > 1
        elif protocol == "sequential":
            assert [{s.gap for s in episodes[e].steps} for u in mine for e in u.episodes] == [{2}, {5}]
        else:
            assert len(mine) == 1


@pytest.mark.parametrize("protocol", ["single", "sequential"])
def test_two_local_workers_match_one_process(setup: Setup, tmp_path: Path, protocol: str) -> None:
    extra = ("methods=[ft_llm,noop]", f"protocol={protocol}", "gaps=[1,3]")
    one, one_summary = small_run(setup, tmp_path / "one", *extra)
    two, two_summary = small_run(setup, tmp_path / "two", *extra, executor=LocalWorkers(2))
    _same(_by_key(one.records()), _by_key(two.records()))
    _same(_metrics(one_summary), _metrics(two_summary))


def test_ray_actors_match_one_process(setup: Setup, tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="the Ray executor needs `pip install ray` (the dev extra has it)")
    extra = ("methods=[ft_llm,noop]",)
    one, one_summary = small_run(setup, tmp_path / "one", *extra)
    two, two_summary = small_run(setup, tmp_path / "ray", *extra, executor=RayWorkers(2))
    _same(_by_key(one.records()), _by_key(two.records()))
    _same(_metrics(one_summary), _metrics(two_summary))


def test_workers_resume_a_cut_run_without_repeating_cases(setup: Setup, tmp_path: Path) -> None:
    extra = ("methods=[ft_llm,noop]",)
    full, full_summary = small_run(setup, tmp_path / "full", *extra)
    cut = tmp_path / "cut"
    shutil.copytree(full.path, cut)
    lines = (cut / "cases.jsonl").read_text().splitlines(keepends=True)
    (cut / "cases.jsonl").write_text("".join(lines[:5]))
    store = RunStore.open(cut)
    cfg = load_config(None, small_overrides(setup, tmp_path, *extra))
    summary = run(cfg, store, executor=LocalWorkers(2))
    keys = [(r.run.method, r.case_id) for r in store.records()]
    assert len(keys) == len(set(keys)) == 12
    _same(_metrics(full_summary), _metrics(summary))


def test_bad_executor_settings_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="unknown executor 'dask'"):
        executor_for("dask", 2)
    with pytest.raises(ConfigError, match="at least 1"):
        executor_for("local", 0)
    assert main(["run", "--workers", "0", "limit=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--workers" in err
