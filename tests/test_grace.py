"""GRACE on tiny models: the edit holds, far prompts are bit-identical, lifelong edits share one
codebook and restore in reverse order, codebook rules, configs, collapse, and the world model."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import nn

from mmke.bundled import bundled_dir
from mmke.data.benchmark import load_benchmark
from mmke.data.images import ImageStore
from mmke.errors import ConfigError
from mmke.methods import EditCollapsed
from mmke.methods.grace import Codebook, Grace, GraceAdaptor
from mmke.models import LVLM
from mmke.models.tiny import tiny_model
from mmke.registry import methods
from mmke.types import EditCase, EditFact, EditType, ImageRef, ProbeKind, Sample

UNRELATED = [Sample("london is a city in", "england"), Sample("the sign is red and the sky is", "blue")]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ImageStore:
    root = tmp_path_factory.mktemp("images")
    Image.new("RGB", (32, 32), (220, 20, 20)).save(root / "red.png")
    Image.new("RGB", (32, 32), (20, 20, 220)).save(root / "blue.png")
    return ImageStore(root)


def make_case(model: LVLM, target: str = "rome", prompt: str = "what is the capital of france?") -> EditCase:
    image = ImageRef("red.png") if model.family.multimodal else None
    return EditCase(f"case-{target}", EditType.VISUAL_ENTITY, EditFact(prompt, target, image), ())


def state(model: LVLM) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def assert_state(model: LVLM, before: dict[str, torch.Tensor]) -> None:
    now = model.model.state_dict()
    assert now.keys() == before.keys()
    assert all(torch.equal(now[k], before[k]) for k in before)


def all_logits(model: LVLM, items: list[Sample]) -> torch.Tensor:
    with torch.inference_mode():
        return model.logits(model.encode(items), answer_only=False)  # (B, T, V)


@pytest.mark.parametrize("kind", ["llava", "causal_lm", "blip2", "qwen2_vl", "idefics3"])
def test_grace_edit_holds_far_prompts_are_untouched_and_restore_is_exact(
    kind: str, store: ImageStore
) -> None:
    model = tiny_model(kind, seed=0).bind_images(store)
    case, before, far = make_case(model), state(model), all_logits(model, UNRELATED)
    site = model.layout.mlp_out(-1)
    original = model.layout.module(site)
    with Grace().applied(model, case) as edited:
        assert edited.score([case.edit])[0].exact_match
        assert torch.equal(all_logits(model, UNRELATED), far)  # bit-identical: no key within eps
        adaptor = model.layout.module(site)
        assert isinstance(adaptor, GraceAdaptor) and adaptor.layer is original
        assert edited.details["actions"][0] == "add" and len(edited.details["losses"]) == 20
        width_in, width_out = original.weight.shape[1], original.weight.shape[0]
        assert edited.edited_params == len(adaptor.codebook) * (
            width_in + width_out + 1
        )  # keys, values, radii
    assert model.layout.module(site) is original
    assert_state(model, before)
    assert all(p.grad is None for p in model.model.parameters())


def test_adaptor_replaces_only_matched_positions_bit_identically() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    adaptor = GraceAdaptor(layer)
    x = torch.randn(2, 5, 4)  # (B, T, I)
    key, value = x[1, 2], torch.full((3,), 7.0)
    adaptor.codebook.insert(key, value, "t", eps=1e-3)
    out, plain = adaptor(x), layer(x)  # (B, T, D)
    hit = torch.zeros(2, 5, dtype=torch.bool)
    hit[1, 2] = True
    assert torch.equal(out[hit], value[None])
    assert torch.equal(out[~hit], plain[~hit])


def test_codebook_adds_expands_and_splits_as_grace_does() -> None:
    book, value = Codebook(), torch.zeros(2)
    assert book.insert(torch.tensor([0.0, 0.0]), value, "a", eps=1.0) == (0, "add")
    assert book.insert(torch.tensor([5.0, 0.0]), value, "a", eps=1.0) == (1, "add")  # farther than 1 + 1
    assert book.insert(torch.tensor([0.0, 1.5]), value, "a", eps=1.0) == (0, "expand")  # same target
    assert book.radii is not None and book.radii.tolist() == [1.5, 1.0]
    assert book.insert(torch.tensor([5.0, 1.6]), value, "b", eps=1.0) == (2, "split")  # other target
    assert book.radii.tolist() == pytest.approx([1.5, 0.8, 0.8])
    assert len(book) == 3 and book.floats == 3 * (2 + 2 + 1)


def test_sequential_edits_share_one_adaptor_and_restore_in_reverse_order(store: ImageStore) -> None:
    model = tiny_model("llava").bind_images(store)
    before, site = state(model), model.layout.mlp_out(-1)
    original, editor = model.layout.module(site), Grace()
    rome, london = make_case(model, "rome"), make_case(model, "paris", "london is a city in")
    first = editor.apply(model, rome)
    adaptor = model.layout.module(site)
    second = editor.apply(model, london)
    assert model.layout.module(site) is adaptor and adaptor.layer is original  # no stacked wrapper
    n_first = first.details["entries"]
    assert second.details["entries"] > n_first and second.edited_params > first.edited_params
    assert all(s.exact_match for s in second.score([rome.edit, london.edit]))
    with pytest.raises(RuntimeError, match="reverse order"):
        first.restore()
    second.restore()
    assert len(adaptor.codebook) == n_first and model.layout.module(site) is adaptor
    assert first.score([rome.edit])[0].exact_match
    first.restore()
    assert model.layout.module(site) is original
    assert_state(model, before)


def test_grace_config_is_validated() -> None:
    assert isinstance(methods.get("grace")(), Grace)
    with pytest.raises(ConfigError, match="did you mean 'eps'"):
        Grace({"epss": 2.0})
    with pytest.raises(ConfigError, match="eps must be > 0"):
        Grace({"eps": 0})
    assert Grace({"layer": "0", "steps": "5"}).config.steps == 5


@pytest.mark.parametrize("prior_edit", [False, True])
def test_grace_collapse_raises_with_step_and_leaves_the_model_as_it_was(
    prior_edit: bool, store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model("llava").bind_images(store)
    before, site = state(model), model.layout.mlp_out(-1)
    original = model.layout.module(site)
    first = Grace().apply(model, make_case(model, "paris")) if prior_edit else None
    wrapped = model.layout.module(site)
    real_loss, calls = model.loss, []

    def loss_turning_nan(batch):  # two real steps, then NaN
        calls.append(1)
        loss = real_loss(batch)
        return loss if len(calls) <= 2 else loss * float("nan")

    monkeypatch.setattr(model, "loss", loss_turning_nan)
    with pytest.raises(EditCollapsed, match="step 2") as err:
        Grace().apply(model, make_case(model, "rome", "london is a city in"))
    assert err.value.step == 2
    if first is not None:  # the earlier edit keeps its adaptor and its entries
        assert model.layout.module(site) is wrapped and len(wrapped.codebook) == first.details["entries"]
        first.restore()
    assert model.layout.module(site) is original
    assert_state(model, before)


def test_generation_of_far_prompts_is_unchanged(store: ImageStore) -> None:
    model = tiny_model("causal_lm").bind_images(store)
    pre = model.generate(UNRELATED, max_new_tokens=6)
    with Grace().applied(model, make_case(model)) as edited:
        assert edited.generate(UNRELATED, max_new_tokens=6) == pre


@pytest.mark.skipif(not (bundled_dir() / "config.json").is_file(), reason="bundled world model not built")
def test_grace_flips_the_world_model_and_keeps_its_text_locality() -> None:
    bench = load_benchmark("world")
    model, case = LVLM.load("world", images=ImageStore(bench.image_root)), bench.cases[0]
    reliability, locality = case.probes_of(ProbeKind.RELIABILITY), case.probes_of(ProbeKind.TEXT_LOCALITY)
    pre_rel, pre_loc = model.score(reliability), model.score(locality)
    with Grace().applied(model, case) as edited:
        post_rel, post_loc = edited.score(reliability), edited.score(locality)
    assert not pre_rel[0].exact_match and post_rel[0].exact_match
    for a, b in zip(pre_loc, post_loc, strict=True):  # T-Loc: same predictions, same NLL
        assert torch.equal(a.argmax_ids, b.argmax_ids) and a.nll == b.nll


@pytest.mark.parametrize("kind", ["llava", "causal_lm"])
def test_a_multi_token_target_gets_one_key_per_answer_position(kind: str, store: ImageStore) -> None:
    model = tiny_model(kind).bind_images(store)
    case = make_case(model, "the sky is blue in england")
    with Grace().applied(model, case) as edited:
        (score,) = edited.score([case.edit])
        assert score.exact_match and edited.details["entries"] == score.n_tokens > 1
