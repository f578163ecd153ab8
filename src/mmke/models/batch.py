"""A teacher-forced batch: model inputs plus labels that mark the answer span, taken in context.

The answer tokens are found from character offsets of the full prompt+target encoding, never by
tokenising the target alone: for byte-level BPE " Paris" and "Paris" are different ids, and
only the in-context one is what the model must predict. ``tail_labels`` builds the papers'
labels instead (target tokenised alone, at the end), for the paper protocols whose
format says so (``PromptFormat.target_alone``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from mmke.errors import BadRecordError
from mmke.models.families._base import Encoded

IGNORE = -100  # the label value HF losses skip


@dataclass
class Batch:
    """Model inputs (``inputs``, passed as ``model(**inputs)``) and ``labels`` (B, T).

    ``labels[b, t]`` is the input id at t when t is an answer token of item b, else -100; the
    logit predicting it sits at t - 1. Padding is on the right, so every item keeps positions
    0..n-1 and scores the same as when encoded alone. ``texts`` are the full prompt+target texts
    (``LVLM.full_text``) and ``offsets`` / ``text_lengths`` map tokens back to their characters
    (see ``token_positions``).
    """

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor  # (B, T)
    texts: tuple[str, ...] = ()
    offsets: torch.Tensor | None = field(default=None, repr=False)  # (B, T, 2), on the CPU
    text_lengths: tuple[int, ...] = ()
    #: Leading tokens every item shares but for what its image puts in its image slots: a forward
    #: runs them once per image (``LVLM.logits``), ``prefix_rows[b]`` being the row that item b's
    #: image is run in (the first item with that image).
    prefix: int = 0
    prefix_rows: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])

    @property
    def answer_mask(self) -> torch.Tensor:
        return self.labels != IGNORE  # (B, T)

    @property
    def answer_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(item, position) of every answer token, item-major: the order of ``answer_labels``."""
        rows, cols = self.answer_mask.nonzero(as_tuple=True)  # (N,), (N,)
        return rows, cols

    @property
    def answer_labels(self) -> torch.Tensor:
        return self.labels[self.answer_mask]  # (N,)

    @property
    def answer_lengths(self) -> list[int]:
        return self.answer_mask.sum(dim=1).tolist()

    def token_positions(self, item: int, start: int, end: int) -> torch.Tensor:
        """Positions of item's tokens that overlap characters [start, end) of ``texts[item]``.

        For spans after the image placeholder (where every family puts the question), e.g. the
        subject whose last token ROME edits: ``text.rindex(subject)`` gives ``start``.
        """
        if self.offsets is None:
            raise ValueError("this batch carries no token offsets")
        shift = self.text_lengths[item] - len(self.texts[item])  # chars added by image expansion
        lo, hi = self.offsets[item, :, 0], self.offsets[item, :, 1]  # (T,), (T,)
        hit = (hi > lo) & (lo < end + shift) & (hi > start + shift)  # (T,)
        return hit.nonzero().squeeze(1)  # (n,)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """Move to a device; floating inputs (pixels) take ``dtype``, ids and masks keep theirs."""
        return replace(self, inputs=move_inputs(self.inputs, device, dtype), labels=self.labels.to(device))


def move_inputs(
    inputs: dict[str, torch.Tensor], device: torch.device | str, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Model inputs on a device; floating ones (pixels) cast to the model's dtype."""
    return {k: _move(v, device, dtype) for k, v in inputs.items()}


def _move(x: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and torch.is_floating_point(x):
        return x.to(device=device, dtype=dtype)
    return x.to(device)


def answer_labels(encoded: Encoded, targets: list[str]) -> torch.Tensor:
    """Labels (B, T): input ids of the tokens whose text overlaps the target's characters.

    The target is the last ``len(target)`` characters of each text. A token that straddles the
    boundary (e.g. byte-level BPE's " Paris", whose space belongs to the prompt) is an answer
    token: its id is what the model must produce there.
    """
    ids = encoded.inputs["input_ids"]  # (B, T)
    mask = encoded.inputs["attention_mask"].bool()  # (B, T)
    end = torch.tensor(encoded.text_lengths)[:, None]  # (B, 1)
    start = end - torch.tensor([len(t) for t in targets])[:, None]  # (B, 1)
    lo, hi = encoded.offsets[..., 0], encoded.offsets[..., 1]  # (B, T), (B, T)
    inside = (hi > lo) & (lo < end) & (hi > start) & mask  # (B, T)
    inside[:, 0] = False  # the first token has no logit predicting it
    _check_spans(inside, targets)
    return ids.masked_fill(~inside, IGNORE)


def _check_spans(inside: torch.Tensor, targets: list[str]) -> None:
    counts = inside.sum(dim=1).tolist()
    for i, (n, target) in enumerate(zip(counts, targets, strict=True)):
        if n == 0:
            raise BadRecordError(f"item {i}: target {target!r} has no tokens to score (empty target?)")


def tail_labels(
    lengths: list[int], width: int, target_ids: list[list[int]], targets: list[str]
) -> torch.Tensor:
    """Labels (B, width): each target tokenised alone, at the last n of its item's ``lengths[b]`` tokens.

    The VLKEB / MMKE-Bench protocol (anchors_spec §2 (C)): the text is prompt + " " + target, but
    the labels are ``tokenizer(target, add_special_tokens=False)``. For byte-level BPE the first
    id is then the bare word, not the in-context " word" — the papers' mismatch, kept on purpose.
    """
    labels = torch.full((len(lengths), width), IGNORE, dtype=torch.long)  # (B, T)
    for i, (ids, length, target) in enumerate(zip(target_ids, lengths, targets, strict=True)):
        n = len(ids)
        if n == 0:
            raise BadRecordError(f"item {i}: target {target!r} has no tokens to score (empty target?)")
        if n >= length:  # the first label needs a logit before it
            raise BadRecordError(
                f"item {i}: target {target!r} is {n} tokens alone but its text is only {length} tokens"
            )
        labels[i, length - n : length] = torch.tensor(ids)
    return labels
