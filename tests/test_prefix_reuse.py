"""A batch whose items share a long prompt prefix (IKE's demonstrations) runs it once: same scores."""

from __future__ import annotations

import pytest
import torch

from mmke.data.images import ImageStore
from mmke.models import LVLM
from mmke.models.scoring import CANONICAL, scorer_named
from mmke.models.tiny import tiny_model
from mmke.types import ImageRef, Sample

DEMOS = (
    "New Fact: the capital of france is rome\nPrompt: the capital of france is rome\n\n"
    "New Fact: the capital of france is rome\nPrompt: "
)
QUESTIONS = [
    ("what is this?", "paris"),
    ("the capital of italy is", "rome and more"),
    ("who painted it?", "a red square"),
]


def items(lvlm: LVLM) -> list[Sample]:
    image = ImageRef("red.png") if lvlm.family.multimodal else None
    asked = [Sample(DEMOS + q, t, image) for q, t in QUESTIONS]
    return [*asked, Sample(DEMOS + "where is it?", "london"), Sample(DEMOS + "and this?", "rome", image)]


def spied(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    cuts: list[int] = []
    real = LVLM._logits_after_prefix

    def spy(self: LVLM, batch, answer_only: bool):  # type: ignore[no-untyped-def]
        cuts.append(batch.prefix)
        return real(self, batch, answer_only)

    monkeypatch.setattr(LVLM, "_logits_after_prefix", spy)
    return cuts


@pytest.mark.parametrize("kind", ["llava", "causal_lm"])
@pytest.mark.parametrize("scoring", ["mmke", "vlkeb"])
def test_prefix_reused_scores_equal_the_scores_alone(
    kind: str, scoring: str, store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    lvlm = tiny_model(kind).bind_images(store).bind_scorer(scorer_named(scoring))
    asked = items(lvlm)
    cuts = spied(monkeypatch)
    together = lvlm.score(asked)
    assert cuts and all(c >= 16 for c in cuts)  # the demonstrations ran once per image
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
