"""The public Python API (docs/api.md): load by name, edit in a block, evaluate, and the example."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmke
from mmke.errors import ConfigError, EditorNotReadyError, UnknownNameError
from mmke.eval.records import RunSummary
from mmke.models.base import LVLM

ROOT = Path(__file__).resolve().parents[1]


def _state(model: LVLM) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def test_import_is_cheap_and_exports_the_api() -> None:
    code = "import sys, mmke; print('torch' in sys.modules, callable(mmke.evaluate))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
    assert {"load_model", "load_benchmark", "load_method", "edit_case", "evaluate"} <= set(mmke.__all__)


def test_load_edit_in_a_block_and_restore(setup: tuple[Path, Path]) -> None:
    world, model_dir = setup
    bench = mmke.load_benchmark(
        f"native:{world / 'cases_eval.jsonl'}", image_root=world, train=str(world / "cases_train.jsonl")
    )
    assert bench.cases and bench.train_cases
    model = mmke.load_model(model_dir, images=bench)
    editor = mmke.load_method("ft_llm", model, steps=15, lr=0.05)
    assert editor.config.steps == 15  # the options reach the method's config
    case = bench.cases[0]
    before, pre = _state(model), model.score([case.edit])[0]
    with editor.apply(model, case) as edited:
        post = edited.score([case.edit])[0]
        assert post.nll < pre.nll
        assert len(edited.generate([case.edit], max_new_tokens=3)) == 1
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)

    mine = mmke.edit_case("what is four plus nine ?", "ten")
    assert mine.probes[0].prompt == mine.edit.prompt and mine.edit.image is None
    with pytest.raises(EditorNotReadyError, match="no train cases"):
        mmke.load_method("ike", model)
    with pytest.raises(UnknownNameError, match="did you mean 'ft_llm'"):
        mmke.load_method("ft_lm", model)


def test_evaluate_runs_like_mmke_run_and_returns_the_summary(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    world, model_dir = setup
    settings = {
        "benchmark": f"native:{world / 'cases_eval.jsonl'}",
        "image_root": str(world),
        "model": str(model_dir),
        "method_options": {"ft_llm": {"steps": 3}},
    }
    summary = mmke.evaluate(settings, methods=["ft_llm", "grace"], limit=3, out=tmp_path, run_id="api")
    assert isinstance(summary, RunSummary)
    groups = [g for g in summary.groups if g.edit_type == "all" and g.task is None]
    assert sorted(str(g.method) for g in groups) == ["ft_llm", "grace"]
    assert all(g.n_cases == 3 and "reliability" in g.metrics for g in groups)
    assert (tmp_path / "api" / "summary.json").is_file()  # where `mmke report` finds it
    assert summary.run.method_options["ft_llm"]["steps"] == 3
    with pytest.raises(ConfigError, match="protocl"):
        mmke.evaluate(settings, protocl="single", out=tmp_path)


def test_the_example_script_runs_on_the_embedded_default(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "python_api.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "before:" in out and "after: " in out and "restored:" in out
    assert "rome" in out and "ft_llm" in out and "Rel" in out
