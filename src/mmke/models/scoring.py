"""Per-item scores of a teacher-forced pass: token accuracy, exact match, target NLL, top-k ids.

Only the answer span is kept (the logits predicting each target token), so memory is
O(answer tokens x vocab) per batch, never O(sequence x vocab). ``score_sequences`` (for
``scoring="vlkeb"``) takes full logits and also keeps every position's top-k ids.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import overload

import torch

from mmke.models.batch import IGNORE


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
