"""LVLM on tiny random models of every family: scoring in context, batching, generation, layout, loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmke.data.images import ImageStore
from mmke.errors import BadRecordError, ModelLoadError
from mmke.models import LVLM, LayoutError, ModalityError
from mmke.models._loading import infer_family
from mmke.models.tiny import TINY_KINDS, save_tiny, tiny_model
from mmke.registry import model_families
from mmke.types import ImageRef, Probe, ProbeKind, Sample

VLM_KINDS = [k for k in TINY_KINDS if k != "causal_lm"]

MIXED = [
    Sample("what is the capital of france?", "paris", ImageRef("red.png")),
    Sample("the capital of france is", "paris"),
    Sample("what colour is the sign?", "red", ImageRef("blue.png")),
    Sample("london is a city in", "england"),
    Sample("who painted this picture?", "a red square", ImageRef("wide.png")),
    Sample("rome is the capital of", "italy", ImageRef("red.png")),
]


def items_for(model: LVLM) -> list[Sample]:
    if model.family.multimodal:
        return MIXED
    return [Sample(s.prompt, s.target) for s in MIXED]


# --- scoring --------------------------------------------------------------------------------


def test_score_mixed_text_and_image_items(model: LVLM) -> None:
    items = items_for(model)
    scores = model.score(items, topk=5)
    assert len(scores) == len(items)
    for item, s in zip(items, scores, strict=True):
        n = s.n_tokens
        assert n >= 1
        assert s.topk_ids.shape == (n, 5) and s.argmax_ids.shape == (n,)
        assert torch.equal(s.topk_ids[:, 0], s.argmax_ids)
        assert 0.0 <= s.token_accuracy <= 1.0 and s.nll > 0
        assert s.exact_match == bool((s.argmax_ids == s.target_ids).all())
        assert model.tokenizer.decode(s.target_ids).strip() == item.target


def test_batched_scores_equal_one_at_a_time(model: LVLM) -> None:
    items = items_for(model)
    batched = model.score(items, batch_size=len(items))
    for item, b in zip(items, batched, strict=True):
        (one,) = model.score([item], batch_size=1)
        assert b.nll == pytest.approx(one.nll, abs=1e-5)
        assert b.token_accuracy == one.token_accuracy
        assert torch.equal(b.target_ids, one.target_ids)
        assert torch.equal(b.argmax_ids, one.argmax_ids)
        assert torch.equal(b.topk_ids, one.topk_ids)


def test_answer_logits_are_the_full_logits_at_the_answer_span(model: LVLM) -> None:
    batch = model.encode(items_for(model))
    with torch.no_grad():
        span = model.logits(batch)  # (N, V)
        full = model.logits(batch, answer_only=False)  # (B, T, V)
    rows, cols = batch.answer_positions
    assert span.shape == (len(rows), full.shape[-1])
    torch.testing.assert_close(span, full[rows, cols - 1], atol=1e-5, rtol=1e-5)


def test_loss_is_differentiable_and_matches_score(model: LVLM) -> None:
    items = items_for(model)[:3]
    batch = model.encode(items)
    loss = model.loss(batch)
    site = model.layout.mlp(-1)
    loss.backward()
    grads = [p.grad for p in model.layout.params(site).values()]
    model.model.zero_grad(set_to_none=True)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    expected = sum(model.score(items).nll) / len(items)
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_token_positions_map_text_spans_to_tokens(model: LVLM) -> None:
    items = items_for(model)
    batch = model.encode(items)
    for b, (item, text) in enumerate(zip(items, batch.texts, strict=True)):
        word = item.prompt.split()[1]  # after the image placeholder, inside the question
        start = text.rindex(item.prompt) + item.prompt.index(f" {word} ") + 1
        pos = batch.token_positions(b, start, start + len(word))
        ids = batch.inputs["input_ids"][b, pos.to(batch.labels.device)]
        assert model.tokenizer.decode(ids).strip() == word


def test_probes_are_scored_like_samples(model: LVLM) -> None:
    probe = Probe(ProbeKind.TEXT_LOCALITY, "the capital of france is", "paris")
    (p,) = model.score([probe])
    (s,) = model.score([Sample(probe.prompt, probe.target)])
    assert p.nll == s.nll and torch.equal(p.topk_ids, s.topk_ids)


def test_empty_target_is_a_bad_record(model: LVLM) -> None:
    with pytest.raises(BadRecordError, match="no tokens"):
        model.score([Sample("the capital of france is", "")])


# --- in-context target tokens ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llava", "blip2", "causal_lm"])
def test_leading_space_target_takes_the_in_context_ids(kind: str) -> None:
    lvlm = tiny_model(kind)
    tok = lvlm.tokenizer
    spaced = tok.encode(" paris", add_special_tokens=False)
    bare = tok.encode("paris", add_special_tokens=False)
    assert spaced != bare  # byte-level BPE: the case that matters
    (s,) = lvlm.score([Sample("the capital of france is", "paris")])
    assert s.target_ids.tolist() == spaced
    own_space = lvlm.full_text(Sample("the capital of france is", " paris"))
    assert own_space == lvlm.full_text(Sample("the capital of france is", "paris"))  # no double space


def test_chat_template_answer_follows_the_assistant_turn_without_space() -> None:
    lvlm = tiny_model("qwen2_vl")
    text = lvlm.full_text(Sample("the capital of france is", "paris"))
    assert text.endswith("<|im_start|>assistant\nparis")
    (s,) = lvlm.score([Sample("the capital of france is", "paris")])
    assert s.target_ids.tolist() == lvlm.tokenizer.encode("paris", add_special_tokens=False)


# --- generation -----------------------------------------------------------------------------


def test_generate_is_batched_greedy_new_text(model: LVLM) -> None:
    items = items_for(model)
    texts = model.generate(items, max_new_tokens=4)
    assert len(texts) == len(items) and all(isinstance(t, str) for t in texts)
    assert any(texts)
    assert texts == [model.generate([it], max_new_tokens=4)[0] for it in items]


# --- layout ---------------------------------------------------------------------------------


def test_layout_roles_resolve_to_real_submodules(model: LVLM) -> None:
    lay = model.layout
    layers = lay.decoder_layers()
    assert len(layers) == 2 and lay.layer(-1) == layers[-1]
    sites = [lay.mlp(-1), lay.mlp_out(0), lay.attention(0), lay.embeddings(), lay.lm_head()]
    assert lay.mlp(-1).startswith(layers[-1] + ".")
    if model.family.multimodal:
        assert len(lay.vision_layers()) == 2 and lay.vision_layer(0) == lay.vision_layers()[0]
        sites += [lay.projector(), lay.vision_tower(), *lay.vision_layers()]
    else:
        for role in (lay.projector, lay.vision_layers, lay.vision_tower):
            with pytest.raises(LayoutError):
                role()
    for site in sites:
        params = lay.params(site)
        assert params, site
        for name, p in params.items():
            assert model.model.get_parameter(name) is p


def test_layout_falls_back_to_older_transformers_paths() -> None:
    from torch import nn

    from mmke.models import Layout
    from mmke.models.families.llava import Llava

    def block() -> nn.Module:
        layer = nn.Module()
        layer.self_attn, layer.mlp = nn.Linear(4, 4), nn.Linear(4, 4)
        return layer

    root = nn.Module()  # the pre-4.52 LLaVA tree: language_model.model.layers
    root.language_model = nn.Module()
    root.language_model.model = nn.Module()
    root.language_model.model.layers = nn.ModuleList([block(), block()])
    lay = Layout(root, Llava.layout_spec)
    assert lay.decoder_layers() == ["language_model.model.layers.0", "language_model.model.layers.1"]
    assert lay.mlp(-1) == "language_model.model.layers.1.mlp"
    with pytest.raises(LayoutError, match="no projector"):
        lay.projector()


def test_blip2_has_a_qformer_and_others_do_not() -> None:
    assert tiny_model("blip2").layout.qformer() == "qformer"
    with pytest.raises(LayoutError, match="Q-Former"):
        tiny_model("llava").layout.qformer()


def test_layout_index_out_of_range(model: LVLM) -> None:
    with pytest.raises(LayoutError, match="out of range"):
        model.layout.mlp(5)


# --- modalities -----------------------------------------------------------------------------


def test_text_only_family_rejects_image_items(store: ImageStore) -> None:
    with pytest.raises(ModalityError, match="text-only"):
        tiny_model("causal_lm").bind_images(store).score(MIXED[:1])


def test_image_item_without_a_store_is_an_error() -> None:
    with pytest.raises(ModalityError, match="no image store is bound to the model"):
        tiny_model("llava").score(MIXED[:1])


# --- loading --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_load_saved_dir_through_from_pretrained(kind: str, tmp_path: Path, store: ImageStore) -> None:
    original = tiny_model(kind, seed=1).bind_images(store)
    loaded = LVLM.load(save_tiny(original, tmp_path / kind), images=store)
    assert loaded.family.name == original.family.name
    assert type(loaded.model) is type(original.model)
    items = items_for(original)
    a, b = original.score(items), loaded.score(items)
    assert a.nll == pytest.approx(b.nll, abs=1e-5)
    assert [s.target_ids.tolist() for s in a] == [s.target_ids.tolist() for s in b]


def test_family_is_inferred_from_the_config(model: LVLM, tmp_path: Path) -> None:
    assert infer_family(model.model.config, tmp_path).name == model.family.name


def test_smolvlm_is_driven_by_idefics3(tmp_path: Path) -> None:
    from transformers import SmolVLMConfig

    assert (
        infer_family(SmolVLMConfig(architectures=["SmolVLMForConditionalGeneration"]), tmp_path).name
        == "idefics3"
    )


def test_families_are_registered() -> None:
    assert {"llava", "blip2", "qwen2_vl", "idefics3", "causal_lm"} <= set(model_families.names())


def test_load_errors_are_one_clear_line(tmp_path: Path) -> None:
    cases: list[tuple[Path, str]] = []
    cases.append((tmp_path / "missing", "no such model directory"))
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", "config.json is missing"))
    weights_only = tmp_path / "weights_only"
    tiny_model("causal_lm").model.save_pretrained(weights_only)
    cases.append((weights_only, "no tokenizer or processor files"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "clip", "architectures": ["CLIPModel"]}))
    cases.append((foreign, "unsupported architecture CLIPModel"))
    for path, message in cases:
        with pytest.raises(ModelLoadError, match=message) as err:
            LVLM.load(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_vlm_dir_without_image_processor_is_a_load_error(tmp_path: Path) -> None:
    lvlm = tiny_model("llava")
    lvlm.model.save_pretrained(tmp_path)
    lvlm.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="image processor") as err:
        LVLM.load(tmp_path)
    assert "huggingface.co" not in str(err.value)


def test_unknown_family_name_is_a_load_error(tmp_path: Path) -> None:
    path = save_tiny(tiny_model("causal_lm"), tmp_path)
    with pytest.raises(ModelLoadError, match="did you mean 'llava'"):
        LVLM.load(path, family="lava")


@pytest.mark.parametrize(
    ("kind", "parts"), [("llava", ["mlp"]), ("blip2", ["fc1", "fc2"]), ("causal_lm", ["mlp"])]
)
def test_mlp_modules_cover_the_whole_mlp_even_without_an_mlp_block(kind: str, parts: list[str]) -> None:
    from mmke.methods import FineTune

    model = tiny_model(kind)
    layer = model.layout.layer(-1)
    assert model.layout.mlp_modules(-1) == [f"{layer}.{p}" for p in parts]
    trained = FineTune({"site": "llm"}).site_params(model)  # FT-LLM's default: the last layer's MLP
    assert trained and all(any(n.startswith(f"{m}.") for m in model.layout.mlp_modules(-1)) for n in trained)
    if kind == "blip2":  # OPT: FT-LLM trains fc1 and fc2, as the anchors' BLIP-2 configs do
        assert {n.rsplit(".", 2)[-2] for n in trained} == {"fc1", "fc2"}


def test_vision_layers_end_at_the_feature_layer_the_model_reads() -> None:
    """LLaVA-1.5 reads the second-to-last vision layer: the last is no edit site (no gradient)."""
    model = tiny_model("llava")
    every = model.layout.vision_layers()
    model.model.config.vision_feature_layer = -2
    assert model.layout.vision_layers() == every[:-1]
    model.model.config.vision_feature_layer = [0, 1]  # hidden states 0 and 1: the first layer's output
    assert model.layout.vision_layers() == every[:1]
