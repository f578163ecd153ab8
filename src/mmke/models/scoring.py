"""Scorers: how a teacher-forced pass becomes per-item scores, and how locality compares two of them.

A ``Scorer`` owns the three choices that distinguish the papers' numbers from ours (reference
anchors_spec §2 (C)): which tokens are the target, what each score keeps, and how a locality probe
compares the edited model with the unedited one. It is chosen once from the config (``scoring=``)
and handed to the model, the edit handles and the metrics.

``canonical`` ("mmke"): the target as tokenised in context; only the answer span is kept (the
logits predicting each target token), so memory is O(answer tokens x vocab) per batch, never
O(sequence x vocab); locality is top-1 agreement over the answer span. ``vlkeb``: the target
tokenised alone at the end of the item, every position's top-k kept, locality the rank-wise
top-k match over every position.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Protocol, overload

import torch

from mmke.models.batch import IGNORE, Batch, tail_labels
from mmke.registry import register_scorer


@dataclass(frozen=True)
class ItemScore:
    """One item's answer span, scored. Id tensors are on the CPU, one row per target token."""

    target_ids: torch.Tensor  # (n,) label ids: in context ("mmke"), tokenised alone ("vlkeb")
    argmax_ids: torch.Tensor  # (n,) the model's top-1 at each answer position
    topk_ids: torch.Tensor  # (n, k) top-k ids, best first
    token_accuracy: float  # mean over target tokens of argmax == label
    exact_match: bool  # every target token right
    nll: float  # mean over target tokens of -log p(label)
    #: (L - 1, k) top-k ids at every logit position of the L-token item (image, prompt, answer);
    #: only for scoring="vlkeb", whose locality compares all positions.
    context_topk: torch.Tensor | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.target_ids.shape[0])


@dataclass(frozen=True)
class ScoredBatch(Sequence[ItemScore]):
    """Scores of a list of items, in the order they were given."""

    items: tuple[ItemScore, ...]

    def __len__(self) -> int:
        return len(self.items)

    @overload
    def __getitem__(self, i: int) -> ItemScore: ...
    @overload
    def __getitem__(self, i: slice) -> ScoredBatch: ...
    def __getitem__(self, i: int | slice) -> ItemScore | ScoredBatch:
        if isinstance(i, slice):
            return ScoredBatch(self.items[i])
        return self.items[i]

    def __iter__(self) -> Iterator[ItemScore]:
        return iter(self.items)

    @property
    def token_accuracy(self) -> list[float]:
        return [s.token_accuracy for s in self.items]

    @property
    def exact_match(self) -> list[bool]:
        return [s.exact_match for s in self.items]

    @property
    def nll(self) -> list[float]:
        return [s.nll for s in self.items]


def score_answers(
    logits: torch.Tensor, labels: torch.Tensor, lengths: list[int], topk: int = 10
) -> list[ItemScore]:
    """Score answer-span logits (N, V) against labels (N,), items of ``lengths`` tokens each, in order."""
    k = min(topk, logits.shape[-1])
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    nll = -logp.gather(1, labels[:, None]).squeeze(1)  # (N,)
    argmax = logits.argmax(dim=-1)  # (N,)
    top = logits.topk(k, dim=-1).indices  # (N, k)
    hit = (argmax == labels).float()  # (N,)
    item = torch.repeat_interleave(
        torch.arange(len(lengths), device=labels.device), torch.tensor(lengths, device=labels.device)
    )  # (N,)
    n = torch.tensor(lengths, dtype=torch.float32, device=labels.device)  # (B,)
    acc = torch.zeros_like(n).index_add_(0, item, hit) / n  # (B,)
    mean_nll = torch.zeros_like(n).index_add_(0, item, nll) / n  # (B,)
    return _items(labels.cpu(), argmax.cpu(), top.cpu(), acc.tolist(), mean_nll.tolist(), lengths)


def score_sequences(
    logits: torch.Tensor, labels: torch.Tensor, lengths: list[int], topk: int = 10
) -> list[ItemScore]:
    """Score full logits (B, T, V) against labels (B, T), keeping all-position top-k ids per item.

    The labelled positions are scored as ``score_answers`` does (the logit before each label);
    ``context_topk`` is the top-k at the first ``lengths[b] - 1`` positions of item b, i.e. every
    logit of its non-pad tokens except the last, which predicts nothing in the text.
    """
    rows, cols = (labels != IGNORE).nonzero(as_tuple=True)  # (N,), (N,), item-major
    counts = torch.bincount(rows, minlength=labels.shape[0]).tolist()  # (B,)
    scores = score_answers(logits[rows, cols - 1], labels[rows, cols], counts, topk)
    top = logits.topk(min(topk, logits.shape[-1]), dim=-1).indices.cpu()  # (B, T, k)
    pairs = zip(scores, lengths, strict=True)
    return [replace(s, context_topk=top[b, : n - 1]) for b, (s, n) in enumerate(pairs)]


def _items(
    labels: torch.Tensor,
    argmax: torch.Tensor,
    top: torch.Tensor,
    acc: list[float],
    nll: list[float],
    lengths: list[int],
) -> list[ItemScore]:
    parts = zip(labels.split(lengths), argmax.split(lengths), top.split(lengths), acc, nll, strict=True)
    return [ItemScore(t, a, k, ac, ac == 1.0, nl) for t, a, k, ac, nl in parts]


# --- locality comparisons ----------------------------------------------------------------------


def agreement(pre_argmax: torch.Tensor, post_argmax: torch.Tensor) -> float:
    """mmke locality: fraction of answer positions whose post-edit top-1 id equals the pre-edit one."""
    if tuple(pre_argmax.shape) != tuple(post_argmax.shape):
        raise ValueError(
            f"pre/post answer spans differ: {tuple(pre_argmax.shape)} vs {tuple(post_argmax.shape)}"
        )
    if pre_argmax.numel() == 0:
        raise ValueError("empty answer span: locality needs at least one answer token")
    return float((pre_argmax == post_argmax).float().mean().item())


def topk_rankwise(pre_topk: torch.Tensor, post_topk: torch.Tensor) -> float:
    """VLKEB/MMKE locality: element-wise (rank-order, not set) match of top-k ids, mean over positions x k."""
    # (n, k) each; the papers compare index lists position by position, so a swap of ranks 1 and 2 costs.
    return agreement(pre_topk, post_topk)


def trailing(pre: torch.Tensor, post: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last min(len(pre), len(post)) rows of each: sequences aligned at their ends."""
    n = min(pre.shape[0], post.shape[0])
    return pre[pre.shape[0] - n :], post[post.shape[0] - n :]


# --- scorers -----------------------------------------------------------------------------------


class Forward(Protocol):
    """What a scorer needs of a model: its tokenizer and its logits for an encoded batch."""

    @property
    def tokenizer(self) -> Any: ...
    def logits(self, batch: Batch, answer_only: bool = True) -> torch.Tensor: ...


class Scorer:
    """How probes are scored: the target's tokens, what a score keeps, the locality comparison."""

    name: str = ""

    def score_batch(self, model: Forward, batch: Batch, targets: Sequence[str], topk: int) -> list[ItemScore]:
        """Scores of one encoded batch (items in batch order)."""
        raise NotImplementedError

    def locality(self, kind: str, post: ItemScore, pre: ItemScore) -> float:
        """How far the edited model (``post``) still agrees with the unedited one (``pre``) on a
        locality probe of ``kind`` ("text_locality" / "image_locality"); 1.0 is untouched."""
        raise NotImplementedError


@register_scorer("mmke", help="targets in context, answer-span scores, top-1 agreement on the answer")
@dataclass(frozen=True)
class InContext(Scorer):
    """mmke's canonical scoring (DESIGN.md "Canonical definitions")."""

    name: str = "mmke"

    def score_batch(self, model: Forward, batch: Batch, targets: Sequence[str], topk: int) -> list[ItemScore]:
        logits = model.logits(batch)  # (N, V)
        return score_answers(logits, batch.answer_labels, batch.answer_lengths, topk)

    def locality(self, kind: str, post: ItemScore, pre: ItemScore) -> float:
        return agreement(pre.argmax_ids, post.argmax_ids)


@register_scorer("vlkeb", help="VLKEB / MMKE-Bench: targets alone at the end, rank-wise top-k locality")
@dataclass(frozen=True)
class AloneTargets(Scorer):
    """The papers' scoring: labels are the target tokenised alone at the end of the item; each
    score keeps every position's top-k ids, and locality is their rank-wise match (text k=1,
    image k=10) over every logit position. It computes full (B, T, V) logits."""

    name: str = "vlkeb"
    locality_k: Mapping[str, int] = field(
        default_factory=lambda: MappingProxyType({"text_locality": 1, "image_locality": 10})
    )

    def score_batch(self, model: Forward, batch: Batch, targets: Sequence[str], topk: int) -> list[ItemScore]:
        ids = [model.tokenizer(t, add_special_tokens=False).input_ids for t in targets]
        lengths = batch.inputs["attention_mask"].sum(dim=1).tolist()  # non-pad tokens (padding is right)
        labels = tail_labels(lengths, batch.labels.shape[1], ids, list(targets))  # (B, T)
        logits = model.logits(batch, answer_only=False)  # (B, T, V)
        if tuple(logits.shape[:2]) != tuple(labels.shape):  # a model that re-lays out its tokens
            raise RuntimeError(
                f"logits {tuple(logits.shape)} do not line up with tokens {tuple(labels.shape)}"
            )
        return score_sequences(logits, labels.to(logits.device), lengths, topk)

    def locality(self, kind: str, post: ItemScore, pre: ItemScore) -> float:
        if pre.context_topk is None or post.context_topk is None:
            raise ValueError(
                "vlkeb locality needs context_topk on the pre and post scores: score both with this scorer"
            )
        k = self.locality_k[kind]
        # Every logit position (image, prompt, answer). When pre and post differ in length (IKE puts
        # demonstrations before the post prompt) they are aligned on the trailing min length, as
        # EasyEdit HEAD's topk_token_match does: the shared tail ends at the same answer token.
        pre_top, post_top = trailing(pre.context_topk, post.context_topk)  # (n, k) each
        return topk_rankwise(pre_top[:, :k], post_top[:, :k])


#: The default wherever no scorer is given.
CANONICAL: Scorer = InContext()


def scorer_named(name: str) -> Scorer:
    """The registered scorer ``name`` (the config's ``scoring=``)."""
    from mmke.registry import scorers

    return scorers.get(name)()
