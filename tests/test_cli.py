"""The CLI turns bad input into one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmke import registry
from mmke.cli import main
from mmke.eval.metrics import metric_specs


def test_unknown_benchmark_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["run", "benchmark=wrold", f"out={tmp_path}"]) == 2
    assert not any(tmp_path.iterdir())  # nothing created before the name was checked
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "unknown benchmark 'wrold'" in err and "did you mean 'world'" in err


def test_missing_native_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["run", f"benchmark=native:{tmp_path / 'nope.jsonl'}", f"out={tmp_path}"]) == 2
    assert "not found" in capsys.readouterr().err


def test_validate_prints_each_problem(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"format": "mmke-cases", "version": 1}) + "\n{oops\n")
    assert main(["validate", str(f)]) == 1
    assert f"{f}:2: invalid JSON" in capsys.readouterr().out.replace("\n", "")


def test_console_script_runs_as_a_process(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not a header\n")
    proc = subprocess.run(
        [sys.executable, "-m", "mmke.cli", "run", f"benchmark=native:{bad}", f"out={tmp_path}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("mmke: error:")


def test_train_editor_trains_saves_and_refuses_untrainable_methods(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["train-editor", "--method", "ft_llm"]) == 2
    assert (
        "ft_llm has nothing to train (trainable: ke, liveedit, mend, serac, visedit)"
        in capsys.readouterr().err
    )
    out = tmp_path / "mend"
    args = ["train-editor", "--method", "mend", "--out", str(out), "method_options.mend.train_steps=3"]
    assert main([*args, "method_options.mend.checkpoint_every=2"]) == 0
    meta = json.loads((out / "editor.json").read_text())
    assert meta["method"] == "mend" and meta["steps"] == 3
    assert not (out / "checkpoint.json").exists()  # a finished run keeps only the editor


def _table_rows(text: str) -> list[list[str]]:
    """The body rows of a printed rich table, as stripped cells."""
    return [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]


def test_list_metrics_shows_every_metric_with_its_paper_name_and_aggregation(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # wide enough that no cell wraps
    assert main(["list", "metrics"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert rows == [[s.key, f"{s.label} ({s.paper})", s.aggregate, s.help, "mmke"] for s in metric_specs()]
    assert ["text_generality", "T-Gen (VLKEB)"] in [r[:2] for r in rows]


def test_list_protocols(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    assert main(["list", "protocols"]) == 0
    names = [r[0] for r in _table_rows(capsys.readouterr().out)]
    assert names == registry.protocols.names()


def test_list_scorers_says_what_each_follows_and_emulates(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")
    assert main(["list", "scorers"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert [r[0] for r in rows] == ["mmke (v1)", "vlkeb (v2)", "mmke_bench (v1)", "easyedit (v1)"]
    by_name = {r[0].split()[0]: r for r in rows}
    assert (
        by_name["vlkeb"][1].startswith("VLKEB/VLKEB main@10951b7") and by_name["vlkeb"][2] == "ft_stale_pre"
    )
    assert by_name["easyedit"][2] == "pre_after_edit" and by_name["mmke"][2] == "–"


@pytest.mark.parametrize("family", ["llava", "blip2", "qwen2_vl", "qwen2_5_vl", "idefics3", "causal_lm"])
def test_build_tiny_model_saves_the_tests_model_offline(
    family: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from mmke.models import LVLM
    from mmke.models.tiny import tiny_model

    out = tmp_path / family
    assert main(["build", "tiny-model", family, "--out", str(out)]) == 0
    assert f"wrote {out}: {family}" in capsys.readouterr().out
    loaded, built = LVLM.load(out), tiny_model(family)
    assert loaded.family.name == built.family.name and (out / "README.md").is_file()
    for (name, a), (_, b) in zip(
        loaded.model.state_dict().items(), built.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert main(["build", "tiny-model", family, "--out", str(out)]) != 0  # never over a folder in use
    assert "is not empty" in capsys.readouterr().err


def test_a_prompt_longer_than_the_model_is_one_line() -> None:
    from mmke.errors import BadRecordError
    from mmke.models.tiny import tiny_model
    from mmke.types import Sample

    lvlm = tiny_model("blip2")  # OPT: a learned table of 512 positions
    with pytest.raises(BadRecordError, match=r"item 0: \d+ tokens, more than the model's 512 learned") as e:
        lvlm.score([Sample("paris " * 600, "rome")])
    assert "\n" not in str(e.value)
    (long,) = tiny_model("causal_lm").score([Sample("paris " * 600, "rome")])  # rotary: no table to overrun
    assert long.n_tokens > 0
