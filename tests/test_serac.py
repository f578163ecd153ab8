"""SERAC on tiny models: routing per item, exact base scores, untouched weights, memory, saved editors."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mmke.data.images import ImageStore
from mmke.errors import ConfigError
from mmke.methods import EditorNotReadyError
from mmke.methods.serac import Serac, SeracEdited, SeracNets
from mmke.methods.trainable import WEIGHTS
from mmke.models import LVLM
from mmke.models.tiny import tiny_model
from mmke.registry import methods
from mmke.types import EditCase, EditFact, EditType, ImageRef, Probe, ProbeKind
from test_methods import assert_state, state
from test_methods import store as store  # the image fixture

KINDS = ("llava", "causal_lm", "blip2", "qwen2_vl", "idefics3")
FAST = {"train_steps": 40, "train_batch": 3, "train_lr": 3e-3, "cf_layers": 1, "proj_dim": 16}
FACTS = [
    ("rome", "what is the capital of italy?", "the capital of italy is"),
    ("oslo", "which city is the capital of norway?", "norway has its capital in"),
    ("lima", "name the capital city of peru", "peru is governed from"),
]
UNRELATED = Probe(ProbeKind.TEXT_LOCALITY, "london is a city in", "england")


class HashEmbedder:
    """A fake sentence embedder (bag of hashed words): fast, deterministic, similar texts similar."""

    name = "hash-words"

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.split():
                out[i, zlib.crc32(word.encode()) % 64] += 1.0
        return out


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MMKE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fact_case(target: str, prompt: str, rephrase: str, image: str | None) -> EditCase:
    img = ImageRef(image) if image else None
    probes = (
        Probe(ProbeKind.RELIABILITY, prompt, target, img),
        Probe(ProbeKind.TEXT_GENERALITY, rephrase, target, img),
        UNRELATED,
        Probe(ProbeKind.TEXT_LOCALITY, "the sign is red and the sky is", "blue"),
    )
    return EditCase(f"case-{target}", EditType.VISUAL_ENTITY, EditFact(prompt, target, img, "paris"), probes)


def cases_for(model: LVLM) -> list[EditCase]:
    image = "red.png" if model.family.multimodal else None
    return [fact_case(*fact, image=image) for fact in FACTS]


def trained(model: LVLM, out: Path, **overrides: object) -> Serac:
    editor = Serac({**FAST, **overrides}, embedder=HashEmbedder())
    editor.fit(model, cases_for(model), out)
    return editor


def same_scores(a: object, b: object) -> bool:
    return all(
        x.nll == y.nll and torch.equal(x.topk_ids, y.topk_ids)
        for x, y in zip(a, b, strict=True)  # type: ignore[call-overload]
    )


@pytest.mark.parametrize("kind", KINDS)
def test_serac_routes_edits_to_the_counterfactual_model_and_leaves_the_rest_exact(
    kind: str, store: ImageStore, tmp_path: Path
) -> None:
    model = tiny_model(kind).bind_images(store)
    editor = Serac(FAST, embedder=HashEmbedder())
    case = cases_for(model)[0]
    with pytest.raises(EditorNotReadyError):
        editor.apply(model, case)
    before = state(model)
    editor.fit(model, cases_for(model), tmp_path / "ed")
    assert_state(model, before)
    edit_probe, unrelated = case.probes[0], UNRELATED
    pre = model.score([edit_probe, unrelated])
    with editor.apply(model, case) as edited:
        assert isinstance(edited, SeracEdited)
        assert edited.routes([edit_probe, unrelated]) == [editor.memory(model)[0], None]
        post = edited.score([edit_probe, unrelated])
        assert post[0].nll < pre[0].nll
        # base-routed items are scored by the unedited model in a batch of their own: bit-identical
        alone = model.score([unrelated])
        assert same_scores(post[1:], alone)
        assert same_scores(edited.score([unrelated]), alone)
        texts = edited.generate([unrelated], max_new_tokens=3)
        assert texts == model.generate([unrelated], max_new_tokens=3)
    assert editor.memory(model) == []
    assert_state(model, before)
    with pytest.raises(RuntimeError, match="restored"):
        edited.score([unrelated])


def test_stacked_edits_route_to_their_own_edit_and_restore_in_reverse(
    store: ImageStore, tmp_path: Path
) -> None:
    model = tiny_model("llava").bind_images(store)
    editor = trained(model, tmp_path / "ed")
    before = state(model)
    first, second = cases_for(model)[:2]
    one = editor.apply(model, first)
    two = editor.apply(model, second)
    probes = [first.probes[0], second.probes[0], UNRELATED]
    entries = editor.memory(model)
    assert [e.edit for e in entries] == [first.edit, second.edit]
    assert two.routes(probes) == [entries[0], entries[1], None]
    asked = two.view(probes)
    assert asked[0].prompt.startswith(f"{first.edit.prompt} {first.edit.target} . ")
    assert asked[2] is UNRELATED
    two.restore()
    assert one.routes(probes) == [entries[0], None, None]
    one.restore()
    assert editor.memory(model) == []
    assert_state(model, before)


def test_the_classifier_sees_the_image(store: ImageStore, tmp_path: Path) -> None:
    model = tiny_model("llava").bind_images(store)
    editor = trained(model, tmp_path / "ed")
    nets = editor.networks(model)
    assert isinstance(nets, SeracNets)
    prompt = FACTS[0][1]
    red, blue = (Probe(ProbeKind.RELIABILITY, prompt, "rome", ImageRef(p)) for p in ("red.png", "blue.png"))
    text, image, has = editor.features(model).of([red, blue, UNRELATED])
    assert has.tolist() == [True, True, False]
    assert not torch.equal(image[0], image[1]) and torch.equal(text[0], text[1])
    emb = nets.classifier.embed(text, image, has)  # (3, Dt + d)
    k = nets.classifier.text_dim
    assert torch.equal(emb[0, :k], emb[1, :k])
    assert not torch.allclose(emb[0, k:], emb[1, k:])  # same text, other image: other embedding


def test_saved_editor_round_trip_holds_only_the_trained_parts(store: ImageStore, tmp_path: Path) -> None:
    model = tiny_model("llava").bind_images(store)
    editor = trained(model, tmp_path / "ed")
    tensors = load_file(str(tmp_path / "ed" / WEIGHTS))
    assert {k.split(".")[0] for k in tensors} == {"classifier", "cf_layers"}
    assert sum(t.numel() for t in tensors.values()) < sum(p.numel() for p in model.model.parameters())
    again = Serac({**FAST, "editor_path": str(tmp_path / "ed")}, embedder=HashEmbedder())
    case = cases_for(model)[0]
    items = [case.probes[0], case.probes[1], UNRELATED]
    with editor.apply(model, case) as a, again.apply(model, case) as b:
        assert same_scores(a.score(items), b.score(items))


def test_config_is_validated_and_registered() -> None:
    assert methods.get("serac") is Serac
    with pytest.raises(ConfigError, match="cf_layers"):
        Serac({"cf_layers": 0}, embedder=HashEmbedder())
    with pytest.raises(ConfigError, match="threshold"):
        Serac({"threshold": 1.5}, embedder=HashEmbedder())
    with pytest.raises(ConfigError, match="train_lr"):
        Serac({"train_lr": 0.0}, embedder=HashEmbedder())


def test_copy_share_gives_chosen_cases_one_random_word_everywhere() -> None:
    """The augmentation swaps an edit's answer and its probes' (same) answer for one vocabulary word."""
    model = tiny_model("causal_lm")
    editor = Serac({**FAST, "copy_share": 1.0}, embedder=HashEmbedder())
    cases = cases_for(model)
    pairs = [
        (c.edit, p)
        for c in cases
        for p in c.probes
        if p.kind == ProbeKind.RELIABILITY or p.kind == ProbeKind.TEXT_GENERALITY
    ]
    out = editor._with_random_targets(model, pairs, cases)
    assert out == editor._with_random_targets(model, pairs, cases)  # keyed by the batch: resumable
    words = set(editor._words(model))
    for (edit, probe), (old, _) in zip(out, pairs, strict=True):
        assert edit.target in words and probe.target == edit.target and edit.prompt == old.prompt
    assert (
        Serac({**FAST, "copy_share": 0.0}, embedder=HashEmbedder())._with_random_targets(model, pairs, cases)
        == pairs
    )
    # editors trained before the option (copy_share 0) keep their identity
    assert "copy_share" not in Serac(FAST, embedder=HashEmbedder()).identity()
    assert Serac({"copy_share": 0.5}, embedder=HashEmbedder()).identity()["copy_share"] == 0.5
    with pytest.raises(ConfigError, match="copy_share"):
        Serac({"copy_share": 2.0}, embedder=HashEmbedder())
