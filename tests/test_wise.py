"""WISE on tiny models: the edit holds, unrelated prompts are bit-identical, the router's causal rule,
knowledge shards, lifelong edits restore in reverse order, readiness, configs, collapse, world model."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image
from torch import nn

from mmke.bundled import bundled_dir
from mmke.data.benchmark import load_benchmark
from mmke.data.images import ImageStore
from mmke.errors import ConfigError
from mmke.methods import EditCollapsed, EditorNotReadyError
from mmke.methods.wise import Tokens, Wise, WiseAdaptor, running_mean
from mmke.models import LVLM
from mmke.models.tiny import tiny_model
from mmke.registry import methods
from mmke.types import EditCase, EditFact, EditType, ImageRef, Probe, ProbeKind, Sample

FAST = {"steps": 50, "lr": 0.3}  # lr 1.0 (EasyEdit) overshoots the margins on tiny activations
UNRELATED = [Sample("the weather today is", "sunny"), Sample("one plus one is", "two")]
LOCALITY = [
    ("london is a city in", "england"),
    ("the sign is red and the sky is", "blue"),
    ("paris is the capital of", "france"),
    ("water is", "wet"),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ImageStore:
    root = tmp_path_factory.mktemp("images")
    Image.new("RGB", (32, 32), (220, 20, 20)).save(root / "red.png")
    Image.new("RGB", (32, 32), (20, 20, 220)).save(root / "blue.png")
    return ImageStore(root)


def make_case(model: LVLM, target: str = "rome", prompt: str = "what is the capital of france?") -> EditCase:
    image = ImageRef("red.png") if model.family.multimodal else None
    return EditCase(f"case-{target}", EditType.VISUAL_ENTITY, EditFact(prompt, target, image), ())


def train_split(with_image: bool = True) -> list[EditCase]:
    """One train case whose text and image locality probes become WISE's irrelevant inputs."""
    probes = [Probe(ProbeKind.TEXT_LOCALITY, p, t) for p, t in LOCALITY]
    if with_image:
        probes.append(Probe(ProbeKind.IMAGE_LOCALITY, "what color is this?", "blue", ImageRef("blue.png")))
    probes.append(Probe(ProbeKind.RELIABILITY, "not an irrelevant input", "x"))
    return [EditCase("train-0", EditType.VISUAL_ENTITY, EditFact("q", "a"), tuple(probes))]


def trained(model: LVLM, **overrides: object) -> Wise:
    editor = Wise({**FAST, **overrides})
    editor.train(model, train_split())
    return editor


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
def test_wise_edit_holds_unrelated_prompts_are_untouched_and_restore_is_exact(
    kind: str, store: ImageStore
) -> None:
    model = tiny_model(kind, seed=0).bind_images(store)
    unrelated = UNRELATED + [Sample(p, t) for p, t in LOCALITY]  # unseen and train locality prompts
    case, before, far = make_case(model), state(model), all_logits(model, unrelated)
    site = model.layout.mlp_out(-1)
    original = model.layout.module(site)
    with trained(model).applied(model, case) as edited:
        assert edited.score([case.edit])[0].exact_match
        assert torch.equal(all_logits(model, unrelated), far)  # every position routed to main memory
        adaptor = model.layout.module(site)
        assert isinstance(adaptor, WiseAdaptor) and adaptor.layer is original
        assert edited.details["eps"] < edited.details["edit_score"] and len(edited.details["losses"]) == 50
        assert edited.edited_params == original.weight.numel()  # the side memory
    assert model.layout.module(site) is original
    assert_state(model, before)
    assert all(p.grad is None for p in model.model.parameters())


def test_router_sends_a_sequence_to_the_side_memory_once_its_running_mean_exceeds_eps() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    adaptor = WiseAdaptor(layer)
    x = torch.randn(2, 5, 4)  # (B, T, I)
    assert torch.equal(adaptor(x), layer(x))  # no edit yet: nothing routes
    adaptor.side = layer.weight.detach() + torch.randn(3, 4)
    score = adaptor.scores(x).detach()  # (B, T)
    running = score.cumsum(dim=1) / torch.arange(1, 6)  # (B, T)
    adaptor.eps = float(running[0].median())
    out, main = adaptor(x), layer(x)  # (B, T, D)
    side = nn.functional.linear(x, adaptor.side, layer.bias)
    route = running > adaptor.eps  # (B, T)
    assert route.any() and not route.all()
    assert torch.equal(out[~route], main[~route]) and torch.equal(out[route], side[route])


def test_padding_never_routes_and_cached_steps_continue_the_sequence_mean() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    adaptor = WiseAdaptor(layer)
    adaptor.side = layer.weight.detach() + torch.randn(3, 4)
    x = torch.randn(2, 6, 4)  # (B, T, I)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding, as in generation
    adaptor.eps = float(running_mean(adaptor.scores(x).detach(), mask.bool())[0].median())
    adaptor.tokens = Tokens(2, 6, mask, continuing=False)
    whole = adaptor(x)  # (B, T, D): one pass
    adaptor.tokens = Tokens(2, 3, mask[:, :3], continuing=False)
    steps = [adaptor(x[:, :3])]
    for t in range(3, 6):  # then one token per call, as a KV-cached generate does
        adaptor.tokens = Tokens(2, 1, mask[:, : t + 1], continuing=True)
        steps.append(adaptor(x[:, t : t + 1]))
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=0, atol=1e-6)
    padded = x.clone()
    padded[1, :2] = 100.0  # whatever the padding holds does not change the routing
    adaptor.tokens = Tokens(2, 6, mask, continuing=False)
    assert torch.equal(adaptor(padded)[:, 2:], whole[:, 2:])


def test_each_edit_changes_only_its_shard_within_the_norm_constraint(store: ImageStore) -> None:
    model = tiny_model("causal_lm").bind_images(store)
    site = model.layout.mlp_out(-1)
    with trained(model, mask_ratio=0.2, norm_constraint=0.05).applied(model, make_case(model)):
        adaptor = model.layout.module(site)
        delta = adaptor.side - adaptor.layer.weight  # (O, I)
        moved = (delta != 0).float().mean().item()
        assert 0 < moved <= 0.25  # about mask_ratio of the entries, never the rest
        assert delta.abs().max().item() <= 0.05 + 1e-6
    again = trained(model, mask_ratio=0.2).apply(model, make_case(model))
    adaptor = model.layout.module(site)
    first = adaptor.side.clone()
    again.restore()
    with trained(model, mask_ratio=0.2).applied(model, make_case(model)):
        assert torch.equal(model.layout.module(site).side, first)  # same seed, same shard, same edit


def test_sequential_edits_share_one_side_memory_and_restore_in_reverse_order(store: ImageStore) -> None:
    model = tiny_model("llava").bind_images(store)
    before, site = state(model), model.layout.mlp_out(-1)
    original, editor = model.layout.module(site), trained(model)
    rome, london = make_case(model, "rome"), make_case(model, "paris", "london is a city in")
    first = editor.apply(model, rome)
    adaptor = model.layout.module(site)
    side_after_first, eps_after_first = adaptor.side, adaptor.eps
    second = editor.apply(model, london)
    assert model.layout.module(site) is adaptor and adaptor.layer is original  # no stacked wrapper
    assert second.score([london.edit])[0].exact_match
    assert adaptor.eps <= eps_after_first and not torch.equal(adaptor.side, side_after_first)
    with pytest.raises(RuntimeError, match="reverse order"):
        first.restore()
    second.restore()
    assert adaptor.side is side_after_first and adaptor.eps == eps_after_first
    assert first.score([rome.edit])[0].exact_match
    first.restore()
    assert model.layout.module(site) is original and adaptor.watch is None
    assert_state(model, before)


def test_wise_needs_train_before_apply_and_locality_probes_in_it(store: ImageStore) -> None:
    model = tiny_model("causal_lm").bind_images(store)
    site = model.layout.mlp_out(-1)
    original = model.layout.module(site)
    editor = Wise(FAST)
    assert editor.needs_train_cases
    with pytest.raises(EditorNotReadyError, match="call train"):
        editor.apply(model, make_case(model))
    editor.train(model, [make_case(model)])  # a train split without locality probes
    with pytest.raises(EditorNotReadyError, match="no usable locality probes"):
        editor.apply(model, make_case(model))
    assert model.layout.module(site) is original
    editor.train(model, train_split())  # the image probe is dropped: causal_lm is text-only
    assert editor.irrelevant is not None and len(editor.irrelevant) == len(LOCALITY)


def test_wise_config_is_validated() -> None:
    assert isinstance(methods.get("wise")(), Wise)
    with pytest.raises(ConfigError, match="did you mean 'mask_ratio'"):
        Wise({"mask_ration": 0.3})
    for bad, match in [
        ({"steps": 0}, "steps must be >= 1"),
        ({"lr": 0}, "lr must be > 0"),
        ({"mask_ratio": 0}, "mask_ratio must be in"),
        ({"act_ratio": 1.0}, "act_ratio must be in"),
        ({"alpha": 30.0}, "beta must be > alpha"),
        ({"gamma": -1.0}, "gamma must be >= 0"),
        ({"norm_constraint": 0.0}, "norm_constraint must be > 0"),
        ({"n_irrelevant": 0}, "n_irrelevant must be >= 1"),
    ]:
        with pytest.raises(ConfigError, match=match):
            Wise(bad)
    config = Wise({"layer": "0", "steps": "5", "norm_constraint": None}).config
    assert config.steps == 5 and config.norm_constraint is None


@pytest.mark.parametrize("prior_edit", [False, True])
def test_wise_collapse_raises_with_step_and_leaves_the_model_as_it_was(
    prior_edit: bool, store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model("llava").bind_images(store)
    before, site = state(model), model.layout.mlp_out(-1)
    original, editor = model.layout.module(site), trained(model, steps=5)
    first = editor.apply(model, make_case(model, "paris")) if prior_edit else None
    wrapped = model.layout.module(site)
    kept = (wrapped.side, wrapped.eps) if first is not None else None
    real_loss, calls = model.loss, []

    def loss_turning_nan(batch):  # two real steps, then NaN
        calls.append(1)
        loss = real_loss(batch)
        return loss if len(calls) <= 2 else loss * float("nan")

    monkeypatch.setattr(model, "loss", loss_turning_nan)
    with pytest.raises(EditCollapsed, match="step 2") as err:
        editor.apply(model, make_case(model, "rome", "london is a city in"))
    assert err.value.step == 2
    if first is not None:  # the earlier edit keeps its adaptor, side memory and threshold
        assert model.layout.module(site) is wrapped and kept is not None
        assert wrapped.side is kept[0] and wrapped.eps == kept[1]
        first.restore()
    assert model.layout.module(site) is original
    assert_state(model, before)


def test_generation_of_unrelated_prompts_is_unchanged(store: ImageStore) -> None:
    model = tiny_model("causal_lm").bind_images(store)
    pre = model.generate(UNRELATED, max_new_tokens=6)  # two lengths: left padding
    with trained(model).applied(model, make_case(model)) as edited:
        assert edited.generate(UNRELATED, max_new_tokens=6) == pre
        assert math.isfinite(edited.details["eps"])


@pytest.mark.skipif(not (bundled_dir() / "config.json").is_file(), reason="bundled world model not built")
def test_wise_flips_the_world_model_and_keeps_its_text_locality() -> None:
    bench = load_benchmark("world")
    model, case = LVLM.load("world", images=ImageStore(bench.image_root)), bench.cases[0]
    editor = Wise()
    editor.train(model, bench.train_cases)
    reliability, locality = case.probes_of(ProbeKind.RELIABILITY), case.probes_of(ProbeKind.TEXT_LOCALITY)
    pre_rel, pre_loc = model.score(reliability), model.score(locality)
    with editor.applied(model, case) as edited:
        post_rel, post_loc = edited.score(reliability), edited.score(locality)
    assert not pre_rel[0].exact_match and post_rel[0].exact_match
    for a, b in zip(pre_loc, post_loc, strict=True):  # T-Loc: same predictions, same NLL
        assert torch.equal(a.argmax_ids, b.argmax_ids) and a.nll == b.nll
