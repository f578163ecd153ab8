"""LiveEdit on tiny models: the hard visual filter keeps unrelated inputs bit-identical, the edit's
image with a rephrased prompt takes its expert, lifelong stacking and exact reverse restore,
apply_many, a saved editor reloads, configs; and the shipped editor on the world model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from mmke.bundled import bundled_dir
from mmke.data.images import ImageStore
from mmke.errors import ConfigError
from mmke.methods.liveedit import (
    ExpertLayer,
    LiveEdit,
    LiveEditNets,
    expert_residual,
    mixing_weights,
    read_layer,
    split_parts,
)
from mmke.methods.trainable import WEIGHTS
from mmke.models import LVLM
from mmke.models.tiny import tiny_model
from mmke.registry import methods
from mmke.types import EditCase, EditFact, EditType, ImageRef, Probe, ProbeKind, Sample
from test_methods import assert_state, state

COLOURS = {
    "red": (220, 20, 20),
    "blue": (20, 20, 220),
    "green": (20, 200, 20),
    "yellow": (230, 230, 20),
    "white": (250, 250, 250),
}
FACTS = [  # target, prompt, rephrase, image of the edit, look-alike image of its image-locality probe
    ("rome", "what is the capital of france?", "the capital of france is", "red", "white"),
    ("oslo", "which city is the capital of norway?", "norway has its capital in", "green", "blue"),
    ("lima", "name the capital city of peru", "peru is governed from", "yellow", "red"),
]
TRAIN = {"train_steps": 120, "train_batch": 3, "train_lr": 1e-2}
UNRELATED_TEXT = Probe(ProbeKind.TEXT_LOCALITY, "london is a city in", "england")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ImageStore:
    root = tmp_path_factory.mktemp("images")
    for name, rgb in COLOURS.items():
        Image.new("RGB", (32, 32), rgb).save(root / f"{name}.png")
    return ImageStore(root)


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMKE_CACHE", str(tmp_path / "cache"))


def ref(model: LVLM, colour: str) -> ImageRef | None:
    return ImageRef(f"{colour}.png") if model.family.multimodal else None


def fact_case(model: LVLM, target: str, prompt: str, rephrase: str, image: str, other: str) -> EditCase:
    img = ref(model, image)
    probes = (
        Probe(ProbeKind.RELIABILITY, prompt, target, img),
        Probe(ProbeKind.TEXT_GENERALITY, rephrase, target, img),
        Probe(ProbeKind.IMAGE_LOCALITY, prompt, "paris", ref(model, other)),
        UNRELATED_TEXT,
    )
    return EditCase(f"case-{target}", EditType.VISUAL_ENTITY, EditFact(prompt, target, img, "paris"), probes)


def unrelated(model: LVLM) -> list[Probe]:
    """A different image with unrelated text, and text alone."""
    far = Probe(ProbeKind.IMAGE_LOCALITY, "the sign is red and the sky is", "blue", ref(model, "blue"))
    return [far, UNRELATED_TEXT]


@pytest.fixture(scope="module", params=["llava", "causal_lm"])
def trained(request: pytest.FixtureRequest, store: ImageStore, tmp_path_factory: pytest.TempPathFactory):
    """(model, editor trained on FACTS, cases, folder of the saved editor), per family."""
    model = tiny_model(request.param, seed=0).bind_images(store)
    cases = [fact_case(model, *fact) for fact in FACTS]
    editor = LiveEdit(TRAIN)
    out = tmp_path_factory.mktemp(f"liveedit-{request.param}")
    editor.fit(model, cases, out)
    return model, editor, cases, out


def same_scores(a: Sequence, b: Sequence) -> bool:
    return all(x.nll == y.nll and torch.equal(x.topk_ids, y.topk_ids) for x, y in zip(a, b, strict=True))


def test_unrelated_inputs_are_bit_identical_with_several_experts_live(trained) -> None:
    model, editor, cases, _ = trained
    before, far = state(model), unrelated(model)
    pre = model.score(far)
    site = model.layout.layer(editor.config.layer)
    original = model.layout.module(site)
    handles = [editor.apply(model, case) for case in cases]
    assert isinstance(model.layout.module(site), ExpertLayer)
    assert handles[-1].routes(far) == [None, None]  # no expert survives the filter / textual gate
    assert same_scores(handles[-1].score(far), pre)
    assert handles[-1].generate(far, max_new_tokens=3) == model.generate(far, max_new_tokens=3)
    for handle in reversed(handles):
        handle.restore()
    assert model.layout.module(site) is original
    assert_state(model, before)


def test_the_edit_image_with_a_rephrased_prompt_takes_the_expert(trained) -> None:
    model, editor, cases, _ = trained
    case = cases[0]
    rephrase = case.probes_of(ProbeKind.TEXT_GENERALITY)[0]
    pre = model.score([case.edit, rephrase])
    with editor.applied(model, case) as edited:
        routes = edited.routes([case.edit, rephrase])
        post = edited.score([case.edit, rephrase])
    for route in routes:
        assert route is not None and route[0].tolist() == [0]
        assert 0.5 < float(route[1][0, 0]) <= 1.0  # softmax (1 expert) x sigmoid of the text match
    assert post[0].nll < pre[0].nll - 0.5 and post[0].exact_match  # the edit holds
    assert post[1].nll < pre[1].nll - 0.1  # and reaches its rephrase


def test_look_alike_image_of_the_locality_probe_is_filtered_out(trained) -> None:
    model, editor, cases, _ = trained
    if not model.family.multimodal:
        pytest.skip("no image to filter by")
    with editor.applied(model, cases[0]) as edited:
        look_alike = cases[0].probes_of(ProbeKind.IMAGE_LOCALITY)
        assert edited.routes(look_alike) == [None]
        assert same_scores(edited.score(look_alike), model.score(look_alike))


def test_lifelong_edits_share_one_memory_and_restore_newest_first(trained) -> None:
    model, editor, cases, _ = trained
    before, site = state(model), model.layout.layer(editor.config.layer)
    original, unedited = model.layout.module(site), model.score([c.edit for c in cases])
    first = editor.apply(model, cases[0])
    alone = first.score([cases[0].edit])  # its expert the only one live
    adaptor = model.layout.module(site)
    second = editor.apply(model, cases[1])
    third = editor.apply(model, cases[2])
    assert model.layout.module(site) is adaptor and adaptor.layer is original  # one wrapper
    assert len(adaptor.experts) == 3 and third.details["experts"] == 3
    assert first.edited_params == second.edited_params > 0
    # every live handle sees the whole memory; each edit still routes mostly to its own expert
    edits = [c.edit for c in cases]
    routes = first.routes(edits)
    assert [int(r[0][int(r[1].argmax())]) for r in routes if r is not None] == [0, 1, 2]
    for pre, post in zip(unedited, third.score(edits), strict=True):
        assert post.nll < pre.nll - 0.5
    with pytest.raises(RuntimeError, match="reverse order"):
        second.restore()
    third.restore()
    second.restore()
    assert len(adaptor.experts) == 1 and model.layout.module(site) is adaptor
    assert same_scores(first.score([cases[0].edit]), alone)
    first.restore()
    assert model.layout.module(site) is original
    assert_state(model, before)
    assert all(p.grad is None for p in model.model.parameters())


def test_apply_many_generates_all_experts_in_one_handle(trained) -> None:
    model, editor, cases, _ = trained
    assert LiveEdit.batches
    before, site = state(model), model.layout.layer(editor.config.layer)
    one_by_one = []
    for case in cases:
        with editor.applied(model, case) as edited:
            one_by_one.append(model.layout.module(site).experts[0])
    unedited = model.score([c.edit for c in cases])
    with editor.apply_many(model, cases) as edited:
        experts = model.layout.module(site).experts
        assert len(experts) == 3 and edited.details["experts"] == 3
        for alone, together in zip(one_by_one, experts, strict=True):  # batching changes no expert
            assert torch.allclose(alone.down, together.down, atol=1e-5)
            assert torch.allclose(alone.up, together.up, atol=1e-5)
        for pre, post in zip(unedited, edited.score([c.edit for c in cases]), strict=True):
            assert post.nll < pre.nll - 0.5
        assert edited.routes(unrelated(model)) == [None, None]
    assert not isinstance(model.layout.module(site), ExpertLayer)
    assert_state(model, before)


def test_a_saved_editor_reloads_and_edits_the_same(trained) -> None:
    model, editor, cases, out = trained
    assert (out / WEIGHTS).is_file()
    again = methods.get("liveedit")({**TRAIN, "editor_path": str(out)})
    nets = again.networks(model)  # loaded from the folder, not trained
    assert isinstance(nets, LiveEditNets)
    mine = editor.networks(model).state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in nets.state_dict().items())
    items = [cases[0].edit, *cases[0].probes]
    with editor.applied(model, cases[0]) as edited:
        first = edited.score(items)
    with again.applied(model, cases[0]) as edited:
        assert same_scores(edited.score(items), first)


def test_expert_layer_is_untouched_without_a_mixture_and_mixes_softly() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 8)
    wrapper = ExpertLayer(layer)
    x = torch.randn(2, 3, 8)  # (B, T, D)
    assert torch.equal(wrapper(x), layer(x)) and wrapper.weight is layer.weight  # attributes pass through
    sim = torch.tensor([[4.0, -3.0, 0.5], [1.0, 1.0, 1.0]])
    keep = torch.tensor([[True, False, True], [False, False, False]])
    w = mixing_weights(sim, keep)  # (N, M)
    assert float(w[0, 1]) == 0.0 and bool((w[1] == 0).all())
    assert 0 < float(w[0].sum()) < 1 and float(w[0, 0]) > float(w[0, 2])
    norm = torch.nn.LayerNorm(8)
    down, up = torch.randn(3, 2, 8), torch.randn(3, 2, 8)  # (M, r, D)
    assert bool((expert_residual(x, norm, down, up, w)[1] == 0).all())  # no expert kept: adds nothing


def test_parts_cut_image_query_and_answer_tokens(store: ImageStore) -> None:
    model = tiny_model("llava").bind_images(store)
    items = [
        Sample("what is the capital of france?", "rome", ImageRef("red.png")),
        Sample("london is in", "england"),
    ]
    batch = model.encode(items)
    hidden, _ = read_layer(model, model.layout.layer(-1), batch)
    parts = split_parts(model, batch, hidden)
    assert parts.has_image.tolist() == [True, False]
    image_id = model.tokenizer.convert_tokens_to_ids(model.family.image_token(model.processor))
    n_image = int((batch.inputs["input_ids"][0] == image_id).sum())
    assert int(parts.vision.mask[0].sum()) == n_image > 0 and int(parts.vision.mask[1].sum()) == 0
    answers = batch.answer_mask.sum(dim=1)
    query = parts.query.mask.sum(dim=1)
    assert bool((query > 0).all())
    assert parts.content.mask.sum(dim=1).tolist() == (query + answers + torch.tensor([n_image, 0])).tolist()
    first = int(batch.answer_mask[1].int().argmax())  # the text-only row: every prompt token is query
    assert int(query[1]) == int(batch.inputs["attention_mask"][1, :first].sum())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"heads": 3}, "must divide module_dim"),
        ({"rank": 0}, "must be >= 1"),
        ({"share": 1.5}, "share must be in"),
        ({"loc_lambda": -1.0}, "loss weights"),
        ({"lora_scale": 0.0}, "lora_scale must be > 0"),
        ({"train_steps": 0}, "train_steps"),
        ({"slotz": 2}, "did you mean 'slots'"),
    ],
)
def test_bad_configs_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LiveEdit(overrides)


def test_heads_must_divide_the_models_width() -> None:
    model = tiny_model("causal_lm")  # width 64
    with pytest.raises(ConfigError, match="hidden size 64"):
        LiveEdit({"heads": 3, "module_dim": 9}).build(model)


@pytest.mark.skipif(
    not (bundled_dir() / "editors" / "liveedit" / WEIGHTS).is_file(), reason="no shipped liveedit editor"
)
def test_the_shipped_editor_edits_the_world_model_and_keeps_its_locality() -> None:
    from mmke.data.benchmark import load_benchmark

    bench = load_benchmark("world")
    model = LVLM.load("world", images=ImageStore(bench.image_root))
    presets = yaml.safe_load((bundled_dir() / "mmke_methods.yaml").read_text())
    editor = LiveEdit(presets.get("liveedit", {}))  # the shipped editor's settings
    cases = bench.cases[:3]
    locality = [p for c in cases for p in c.probes if p.kind in (ProbeKind.TEXT_LOCALITY,)]
    pre, edits = model.score(locality), [c.edit for c in cases]
    before = sum(s.nll for s in model.score(edits))
    handles = [editor.apply(model, c) for c in cases]
    try:
        assert sum(s.nll for s in handles[-1].score(edits)) < before - 1.0  # the edits move their answers
        assert same_scores(handles[-1].score(locality), pre)  # text-only inputs never take an image's expert
    finally:
        for h in reversed(handles):
            h.restore()
