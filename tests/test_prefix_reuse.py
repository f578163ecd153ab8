"""A batch whose items share a long prompt prefix (IKE's demonstrations) runs it once: same scores."""

from __future__ import annotations

import pytest
import torch

from mmke.data.images import ImageStore
from mmke.models import LVLM, base
from mmke.models.scoring import CANONICAL, scorer_named
from mmke.models.tiny import tiny_model
from mmke.types import ImageRef, Sample

#: IKE's context: demonstrations, then the new fact, long enough to be worth running once.
DEMOS = "New Fact: the capital of france is rome\nPrompt: the capital of france is rome\n\n" * 12 + (
    "New Fact: the capital of france is rome\nPrompt: "
)
QUESTIONS = [
    ("what is this?", "paris"),
    ("the capital of italy is", "rome and more"),
    ("who painted it?", "a red square"),
]


def items(lvlm: LVLM) -> list[Sample]:
    """An IKE case's probes: the demonstrations before each, on two images (one several times,
    the other once) and on none."""
    image, other = (ImageRef("red.png"), ImageRef("blue.png")) if lvlm.family.multimodal else (None, None)
    asked = [Sample(DEMOS + q, t, image) for q, t in QUESTIONS]
    return [
        *asked,
        Sample(DEMOS + "where is it?", "london"),
        Sample(DEMOS + "and this?", "rome", other),
        Sample(DEMOS + "and that one?", "a blue square", image),
        Sample(DEMOS + "who is it?", "nobody"),
        Sample(DEMOS + "what is that?", "a square"),
    ]


def spied(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Per shared prefix run: its length, and how many rows ran it (one per image)."""
    cuts: list[tuple[int, int]] = []
    real = LVLM._run_prefix

    def spy(self: LVLM, inputs, cut: int, rows):  # type: ignore[no-untyped-def]
        cuts.append((cut, len(set(rows))))
        return real(self, inputs, cut, rows)

    monkeypatch.setattr(LVLM, "_run_prefix", spy)
    return cuts


@pytest.mark.parametrize("kind", ["llava", "causal_lm", "llava_next"])
@pytest.mark.parametrize("scoring", ["mmke", "vlkeb"])
def test_prefix_reused_scores_equal_the_scores_alone(
    kind: str, scoring: str, store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    lvlm = tiny_model(kind).bind_images(store).bind_scorer(scorer_named(scoring))
    asked = items(lvlm)
    cuts = spied(monkeypatch)
    together = lvlm.score(asked)
    assert cuts and all(cut > 100 for cut, _ in cuts)  # the demonstrations ran once per image:
    # the items with an image in one batch whose prefix ran in two rows, those without in one
    if kind != "llava_next":  # whose images take as many tokens as their tiles: red and blue differ
        assert sorted(rows for _, rows in cuts) == ([1, 2] if lvlm.family.multimodal else [1])
    cuts.clear()
    alone = [lvlm.score([it])[0] for it in asked]
    assert not cuts  # one item: nothing to share
    for t, a in zip(together, alone, strict=True):
        assert torch.equal(t.target_ids, a.target_ids) and torch.equal(t.argmax_ids, a.argmax_ids)
        assert torch.equal(t.topk_ids, a.topk_ids)
        assert t.token_accuracy == a.token_accuracy and t.nll == pytest.approx(a.nll, abs=1e-5)
        if scoring == "vlkeb":  # every position's top-k, the shared ones included
            assert torch.equal(t.context_topk, a.context_topk)
    lvlm.bind_scorer(CANONICAL)


@pytest.mark.parametrize("kind", ["blip2", "qwen2_vl"])
def test_families_whose_positions_do_not_follow_the_tokens_run_whole(
    kind: str, store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    lvlm = tiny_model(kind).bind_images(store)
    cuts = spied(monkeypatch)
    lvlm.score(items(lvlm))
    assert not cuts


def test_short_shared_prompts_stay_one_batch(store: ImageStore, monkeypatch: pytest.MonkeyPatch) -> None:
    lvlm = tiny_model("llava").bind_images(store)
    cuts = spied(monkeypatch)
    lvlm.score([Sample("what is " + q, t, ImageRef("red.png")) for q, t in QUESTIONS])
    assert not cuts


@pytest.mark.parametrize("kind", ["llava", "causal_lm"])
def test_generation_after_a_shared_prefix_equals_generation_alone(
    kind: str, store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    lvlm = tiny_model(kind).bind_images(store)
    asked = items(lvlm)
    cuts = spied(monkeypatch)
    together = lvlm.generate(asked, max_new_tokens=6)
    assert sorted(rows for _, rows in cuts) == ([1, 2] if lvlm.family.multimodal else [1])  # once per image
    cuts.clear()
    alone = [lvlm.generate([it], max_new_tokens=6)[0] for it in asked]  # transformers' generate
    assert not cuts and together == alone and any(together)


def test_probes_sharing_only_their_image_run_it_once_where_that_pays(
    store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real model's image is hundreds of tokens: a case's probes of one image run it once. The
    tiny model's image is a few tokens, so the thresholds are lowered to reach it."""
    monkeypatch.setattr(base, "MIN_SAVED_TOKENS", 1)
    monkeypatch.setattr(base, "MIN_SAVED_SHARE", 0.0)
    lvlm = tiny_model("llava").bind_images(store)
    asked = [
        Sample(q, t, ImageRef(image))
        for (q, t), image in zip(QUESTIONS, ["red.png", "blue.png", "red.png"], strict=True)
    ]
    asked += [Sample("how many?", "two", ImageRef("blue.png"))]
    cuts = spied(monkeypatch)
    together = lvlm.score(asked)
    assert [rows for _, rows in cuts] == [2]  # red's and blue's tokens, each once
    for t, it in zip(together, asked, strict=True):
        alone = lvlm.score([it])[0]
        assert torch.equal(t.argmax_ids, alone.argmax_ids) and t.nll == pytest.approx(alone.nll, abs=1e-5)
    assert lvlm.generate(asked, max_new_tokens=4) == [
        lvlm.generate([it], max_new_tokens=4)[0] for it in asked
    ]
