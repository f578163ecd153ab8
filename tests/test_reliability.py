"""Issue 19: one writer per run folder, settings checked before anything is created, and every fault a
user can cause (a full disk, a read-only folder, a missing extra, a second writer) ends as one line
with a non-zero exit that loses no result already computed."""

from __future__ import annotations

import errno
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from _runs import small_overrides
from mmke.cli import _parser, main, run_failures
from mmke.eval.records import GroupSummary, RunInfo, RunSummary
from mmke.eval.store import RunStore


def _err_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert err.count("\n") == 0, err
    return err


def _run_dir(out: Path) -> Path:
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run


@pytest.fixture
def finished(setup: tuple[Path, Path], tmp_path: Path) -> Path:
    """A finished 6-case FT-LLM run made through the CLI."""
    out = tmp_path / "runs"
    assert main(["run", *small_overrides(setup, out, "methods=[ft_llm]")]) == 0
    return _run_dir(out)


# --- 1. one writer per run folder ---------------------------------------------------------


def test_a_second_writer_is_refused_with_the_holders_pid(
    finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import os

    holder = RunStore.open(finished)
    records = holder.records()
    with holder.locked():
        assert main(["run", "--resume", str(finished)]) == 2
        err = _err_line(capsys)
        assert f"is being written by another mmke process (pid {os.getpid()})" in err
    assert holder.records() == records  # nothing written twice
    assert main(["run", "--resume", str(finished)]) == 0  # the lock went with its holder
    assert RunStore.open(finished).records() == records


def test_the_lock_is_released_when_its_holder_is_killed(finished: Path) -> None:
    import subprocess

    code = (
        "import sys, time; from pathlib import Path; from mmke.eval.store import RunStore\n"
        "s = RunStore.open(Path(sys.argv[1])); s.lock(); print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(finished)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(Exception, match=f"pid {proc.pid}"):
            RunStore.open(finished).lock()
    finally:
        proc.kill()  # SIGKILL: no clean-up code runs, the OS drops the lock
        proc.wait()
    store = RunStore.open(finished)
    store.lock()
    store.unlock()


# --- 2. the native reader decodes images; --skip-bad lists them ---------------------------


def test_skip_bad_lists_a_case_with_a_corrupt_image(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Such a case was 'ok' to validate, then an error record that --skip-bad did not list."""
    import shutil

    world, _ = setup
    lines = (world / "cases_eval.jsonl").read_text().splitlines()
    bad = json.loads(lines[1])
    bad["edit"]["image"] = "img/bad.png"
    root = tmp_path / "data"
    shutil.copytree(world, root)
    (root / "img").mkdir()
    (root / "img" / "bad.png").write_text("not a picture")
    cases = root / "cases.jsonl"
    cases.write_text("\n".join([lines[0], json.dumps(bad), lines[2], lines[3]]) + "\n")
    assert main(["validate", str(cases)]) == 1
    assert f"{cases}:2 ({bad['id']}): edit: image 'bad.png' is corrupt" in capsys.readouterr().out
    out = tmp_path / "runs"
    here = (f"benchmark=native:{cases}", f"image_root={root}")  # later settings win
    assert main(["run", *small_overrides(setup, out, "methods=[ft_llm]", *here), "--skip-bad"]) == 0
    run = _run_dir(out)
    (skipped,) = RunStore.open(run).read_skipped()
    assert skipped["case_id"] == bad["id"] and "corrupt" in skipped["problem"]
    assert {r.case_id for r in RunStore.open(run).records()} == {
        json.loads(line)["id"] for line in lines[2:4]
    }


# --- 5. a full disk, a read-only folder ---------------------------------------------------


def test_a_full_disk_mid_run_keeps_every_record_and_resumes(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    out = tmp_path / "runs"
    append = RunStore.append
    calls = {"n": 0}

    def fill_up(self: RunStore, record: dict) -> None:
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.cases_path))
        append(self, record)

    monkeypatch.setattr(RunStore, "append", fill_up)
    assert main(["run", *small_overrides(setup, out, "methods=[ft_llm]")]) == 2
    err = _err_line(capsys)
    run = _run_dir(out)
    assert "No space left on device" in err and "the 3 case record(s) written so far are kept" in err
    assert f"mmke run --resume {run}" in err
    monkeypatch.setattr(RunStore, "append", append)
    assert main(["run", "--resume", str(run)]) == 0
    assert len(RunStore.open(run).records()) == 6


def test_a_read_only_out_folder_fails_before_the_model_loads(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    import mmke.eval.runner as runner

    def read_only(self: Path, *a: object, **k: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "touch", read_only)
    monkeypatch.setattr(runner.LVLM, "load", lambda *a, **k: pytest.fail("model loaded"))
    out = tmp_path / "runs"
    assert main(["run", *small_overrides(setup, out)]) == 2
    assert "(read-only); choose another out= folder" in _err_line(capsys)


def test_report_of_a_read_only_run_is_one_line_and_can_go_elsewhere(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    write_text = Path.write_text

    def read_only(self: Path, *a: object, **k: object) -> int:
        if self.is_relative_to(finished):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return write_text(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", read_only)
    assert main(["report", str(finished)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "report not written (Read-only file system" in err and "--out DIR" in err
    assert main(["report", str(finished), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.html").is_file()


# --- 6. without matplotlib ----------------------------------------------------------------


def test_a_run_without_matplotlib_reports_without_plots(finished: Path, monkeypatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without the extra sees
    assert main(["report", str(finished)]) == 0
    assert "matplotlib is not installed" in (finished / "report.html").read_text()


# --- 7. a run whose every edit collapsed --------------------------------------------------


def test_a_run_whose_every_edit_collapsed_exits_non_zero(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = ("methods=[ft_llm]", "method_options.ft_llm.lr=1e30")
    assert main(["run", *small_overrides(setup, tmp_path, *extra)]) == 1
    assert "failed: ft_llm: every edit collapsed" in capsys.readouterr().out


def test_run_failures_name_what_is_incomplete() -> None:
    group = GroupSummary("m", "ft_llm", "single", None, None, "all", n_cases=4, n_collapsed=1, n_error=0)
    summary = RunSummary(
        RunInfo(config={}, not_run={"ike": "no train split"}),
        (
            group,
            replace(group, method="rome", n_error=2, n_collapsed=2),
            replace(group, method="lora", protocol="lifelong", n_collapsed=4),
        ),
    )
    assert run_failures(summary) == [
        "incomplete: ike not run (no train split)",
        "incomplete: rome: 2 case(s) failed with an error (see cases.jsonl)",
        "failed: lora (lifelong): every edit collapsed (non-finite weights or scores)",
    ]
    assert run_failures(RunSummary(RunInfo(), (replace(group, n_collapsed=0),))) == []


# --- 8. resume with other settings --------------------------------------------------------


def test_resume_refuses_other_settings_and_names_them(
    finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--resume", str(finished), "methods=[ike]", "limit=2"]) == 2
    err = _err_line(capsys)
    assert "the run was started with other settings" in err
    assert "methods (saved ['ft_llm'], given ['ike'])" in err and "limit (saved 6, given 2)" in err
    assert main(["run", "--resume", str(finished), "methods=[ft_llm]", "limit=6"]) == 0  # the same: fine


# --- 9. options and settings in any order -------------------------------------------------


def test_options_and_settings_in_any_order(tmp_path: Path) -> None:
    args = _parser().parse_args(["validate", "F", "--format", "vlkeb", "--image-root", "D", "hop=2"])
    assert (args.file, args.format, args.image_root, args.options) == (
        Path("F"),
        "vlkeb",
        Path("D"),
        ["hop=2"],
    )
    args = _parser().parse_args(
        ["convert", "F", "--from", "vlkeb", "--out", "o.jsonl", "hop=2", "--skip-bad"]
    )
    assert (args.source, args.options, args.skip_bad) == ("vlkeb", ["hop=2"], True)
    args = _parser().parse_args(["run", "limit=2", "--model", "world", "methods=[ft_llm]"])
    assert (args.model, args.overrides) == ("world", ["limit=2", "methods=[ft_llm]"])
    args = _parser().parse_args(["train-editor", "a=1", "--method", "mend", "b=2"])
    assert (args.method, args.overrides) == ("mend", ["a=1", "b=2"])


# --- 11. config files and out= ------------------------------------------------------------


def test_a_non_utf8_config_and_an_out_that_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"limit: 2\nmodel: caf\xe9\n")
    assert main(["run", "--config", str(cfg)]) == 2
    assert f"{cfg}: not UTF-8 text (byte 19)" in _err_line(capsys)
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["run", f"out={afile}", "limit=1", "methods=[ft_llm]"]) == 2
    assert "is a file; out names the folder that holds run folders" in _err_line(capsys)


# --- 12. nothing on disk before the settings are checked ----------------------------------


@pytest.mark.parametrize(
    ("extra", "expect"),
    [
        (("method_options.ft_llm.stepz=3",), "unknown ft_llm config key 'stepz'; did you mean 'steps'?"),
        (("method_options.rome.layer=x",), "rome config key 'layer'"),
        (("image_root=/nonexistent",), "image_root='/nonexistent' is not a directory"),
        (("model=/nonexistent",), "/nonexistent: no such model directory"),
    ],
)
def test_bad_settings_create_nothing_and_load_no_model(
    setup: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch,
    extra: tuple[str, ...],
    expect: str,
) -> None:
    import mmke.eval.runner as runner

    monkeypatch.setattr(runner.LVLM, "load", lambda *a, **k: pytest.fail("model loaded"))
    out = tmp_path / "runs"
    assert main(["run", *small_overrides(setup, out), *extra]) == 2
    assert expect in _err_line(capsys)
    assert not out.exists() or not any(out.iterdir())


def test_the_world_refuses_an_image_root_it_would_ignore(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", f"image_root={tmp_path}", f"out={tmp_path / 'runs'}", "limit=1"]) == 2
    assert "benchmark 'world' draws its own pictures" in _err_line(capsys)
    assert not (tmp_path / "runs").exists()


def test_a_run_that_fails_before_any_record_leaves_no_folder(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    import mmke.eval.runner as runner
    from mmke.errors import ModelLoadError

    def broken(*a: object, **k: object) -> None:
        raise ModelLoadError("weights unreadable")

    monkeypatch.setattr(runner.LVLM, "load", broken)
    out = tmp_path / "runs"
    assert main(["run", *small_overrides(setup, out)]) == 2
    assert "weights unreadable" in _err_line(capsys)
    assert not any(out.iterdir())


def test_resumed_config_is_what_was_saved(finished: Path) -> None:
    saved = yaml.safe_load((finished / "config.yaml").read_text())
    assert saved["methods"] == ["ft_llm"] and saved["allow_pickle"] is False
