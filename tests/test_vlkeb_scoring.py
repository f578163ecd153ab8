"""scoring=vlkeb: the papers' target tokenised alone at the end, and locality over every position."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from mmke.config import load_config
from mmke.data.images import ImageStore
from mmke.errors import BadRecordError, ConfigError
from mmke.eval import probe_result
from mmke.models import LVLM
from mmke.models.batch import IGNORE, tail_labels
from mmke.models.scoring import CANONICAL, ItemScore, Scorer, scorer_named, trailing
from mmke.models.tiny import tiny_model
from mmke.types import ImageRef, Probe, ProbeKind, Sample

MIXED = [
    Sample("what is the capital of france?", "paris", ImageRef("red.png")),
    Sample("the capital of france is", "paris"),
    Sample("london is a city in", "england"),
    Sample("who painted this picture?", "a red square", ImageRef("wide.png")),
    Sample("rome is the capital of", "italy and paris", ImageRef("red.png")),
]

VLKEB = scorer_named("vlkeb")


@contextmanager
def bound(model: LVLM, scorer: Scorer = VLKEB) -> Iterator[LVLM]:
    """The shared fixture model under ``scorer`` for the block, then back to mmke's."""
    try:
        yield model.bind_scorer(scorer)
    finally:
        model.bind_scorer(CANONICAL)


def items_for(model: LVLM) -> list[Sample]:
    return MIXED if model.family.multimodal else [Sample(s.prompt, s.target) for s in MIXED]


def n_tokens(model: LVLM, item: Sample) -> int:
    """The item's non-pad token count when encoded alone (image tokens included)."""
    return int(model.encode([item]).inputs["attention_mask"].sum())


# ---------------------------------------------------------------- labels


def test_tail_labels_put_the_alone_ids_at_the_last_positions() -> None:
    labels = tail_labels([4, 6], 6, [[7, 8], [9]], ["ab", "c"])
    x = IGNORE
    assert labels.tolist() == [[x, x, 7, 8, x, x], [x, x, x, x, x, 9]]


def test_tail_labels_reject_targets_that_do_not_fit() -> None:
    with pytest.raises(BadRecordError, match="item 1: target 'abc' is 3 tokens alone") as e:
        tail_labels([4, 3], 4, [[7], [1, 2, 3]], ["a", "abc"])
    assert "\n" not in str(e.value)
    with pytest.raises(BadRecordError, match="no tokens"):
        tail_labels([4], 4, [[]], [""])


def test_vlkeb_labels_are_the_target_tokenised_alone_at_the_end(model: LVLM) -> None:
    items = items_for(model)
    with bound(model):
        scores = model.score(items, topk=5)
        lengths = [n_tokens(model, item) for item in items]
    for item, s, length in zip(items, scores, lengths, strict=True):
        alone = model.tokenizer(item.target, add_special_tokens=False).input_ids
        assert s.target_ids.tolist() == alone
        n = len(alone)
        # every logit position, the last (which predicts past the answer) included
        assert s.context_topk is not None and s.context_topk.shape == (length, 5)
        # the labels' logits: pred[:, :-1][:, -n:]
        assert torch.equal(s.topk_ids, s.context_topk[:-1][-n:])
        assert s.exact_match == bool((s.argmax_ids == s.target_ids).all())


def test_vlkeb_batched_scores_equal_one_at_a_time(model: LVLM) -> None:
    items = items_for(model)
    with bound(model):
        batched = model.score(items, batch_size=len(items))
        alone = [model.score([item], batch_size=1)[0] for item in items]
    for b, one in zip(batched, alone, strict=True):
        assert b.nll == pytest.approx(one.nll, abs=1e-5)
        assert b.token_accuracy == one.token_accuracy
        assert torch.equal(b.target_ids, one.target_ids)
        assert torch.equal(b.topk_ids, one.topk_ids)
        assert torch.equal(b.context_topk, one.context_topk)


def test_mmke_scoring_keeps_answer_span_logits_only(model: LVLM, monkeypatch: pytest.MonkeyPatch) -> None:
    real, seen = LVLM.logits, []

    def spy(self: LVLM, batch, answer_only: bool = True):  # type: ignore[no-untyped-def]
        seen.append(answer_only)
        return real(self, batch, answer_only)

    monkeypatch.setattr(LVLM, "logits", spy)
    scores = model.score(items_for(model), batch_size=2)
    assert seen and all(seen)  # never the full (B, T, V)
    assert all(s.context_topk is None for s in scores)


@pytest.mark.parametrize("kind", ["llava", "blip2", "causal_lm"])
def test_byte_level_bpe_shows_the_papers_leading_space_mismatch(kind: str) -> None:
    lvlm = tiny_model(kind)
    item = Sample("the capital of france is", "paris")
    (ours,) = lvlm.score([item])
    with bound(lvlm):
        (papers,) = lvlm.score([item])
    spaced = lvlm.tokenizer.encode(" paris", add_special_tokens=False)
    bare = lvlm.tokenizer.encode("paris", add_special_tokens=False)
    assert ours.target_ids.tolist() == spaced and papers.target_ids.tolist() == bare != spaced
    assert papers.nll != pytest.approx(ours.nll)


def test_without_a_space_before_the_target_both_variants_agree(store: ImageStore) -> None:
    # chat template: the answer follows "assistant\n" directly
    lvlm = tiny_model("qwen2_vl").bind_images(store)
    items = [Sample("the capital of france is", "paris"), MIXED[0]]
    ours_all = lvlm.score(items)
    with bound(lvlm):
        papers_all = lvlm.score(items)
    for ours, papers in zip(ours_all, papers_all, strict=True):
        assert torch.equal(ours.target_ids, papers.target_ids)
        assert torch.equal(ours.topk_ids, papers.topk_ids)
        assert ours.nll == pytest.approx(papers.nll, abs=1e-6)


# ---------------------------------------------------------------- locality


def scored(context: list[list[int]], n: int) -> ItemScore:
    """An ItemScore whose answer span is the last ``n`` rows of its all-position top-k ids."""
    top = torch.tensor(context)  # (L - 1, k)
    span = top[-n:]
    return ItemScore(span[:, 0], span[:, 0], span, 1.0, True, 0.5, top)


def locality(kind: ProbeKind, post: ItemScore, pre: ItemScore, scoring: str = "vlkeb") -> float:
    return probe_result(Probe(kind, "q", "a"), post, pre, scorer_named(scoring)).token_accuracy


def test_vlkeb_locality_counts_every_position_not_only_the_answer_span() -> None:
    pre = scored([[1, 2], [3, 4], [5, 6], [7, 8]], n=1)
    post = scored([[9, 2], [3, 9], [5, 6], [7, 8]], n=1)  # same answer span, earlier positions moved
    assert torch.equal(pre.topk_ids, post.topk_ids)
    assert locality(ProbeKind.TEXT_LOCALITY, post, pre, "mmke") == 1.0
    assert locality(ProbeKind.TEXT_LOCALITY, post, pre) == 3 / 4  # top-1 of 4 positions
    assert locality(ProbeKind.IMAGE_LOCALITY, post, pre) == 6 / 8  # rank-wise over positions x k


def test_vlkeb_locality_aligns_different_lengths_on_the_trailing_positions() -> None:
    pre = scored([[5, 6], [7, 8]], n=1)
    post = scored([[0, 0], [0, 0], [0, 0], [5, 6], [7, 8]], n=1)  # e.g. IKE's demonstrations first
    assert locality(ProbeKind.IMAGE_LOCALITY, post, pre) == 1.0
    a, b = trailing(torch.arange(2), torch.arange(5))
    assert a.tolist() == [0, 1] and b.tolist() == [3, 4]
    shorter = scored([[7, 1]], n=1)
    assert locality(ProbeKind.IMAGE_LOCALITY, shorter, pre) == 1 / 2


def test_vlkeb_locality_needs_context_topk() -> None:
    pre = scored([[1, 2], [3, 4]], n=1)
    bare = ItemScore(pre.target_ids, pre.argmax_ids, pre.topk_ids, 1.0, True, 0.5)
    with pytest.raises(ValueError, match=r"context_topk.*score both with this scorer"):
        locality(ProbeKind.TEXT_LOCALITY, bare, pre)


# ---------------------------------------------------------------- config


def test_protocol_vlkeb_points_to_scoring() -> None:
    with pytest.raises(ConfigError, match="set scoring=vlkeb") as e:
        load_config(None, ["protocol=vlkeb"])
    assert "\n" not in str(e.value)
    assert load_config(None, ["scoring=vlkeb"]).scoring == "vlkeb"
