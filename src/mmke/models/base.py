"""The ``LVLM`` wrapper: an HF model and its processor, scored and decoded in batches, plus its edit sites.

Everything model-specific (prompt format, preprocessing, where parts live) comes from the
family; this module owns batching, answer spans, scoring and generation for all of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, Self

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import mmke.models._loading as _loading
from mmke.errors import BadRecordError, MmkeError
from mmke.models.batch import Batch, answer_labels, move_inputs, tail_labels
from mmke.models.families import Encoded, Family
from mmke.models.layout import Layout
from mmke.models.scoring import CANONICAL, ItemScore, ScoredBatch, Scorer
from mmke.types import ImageRef


class ModalityError(MmkeError):
    """An item carries an image the model cannot take (text-only family) or has no image store to open it."""


class Item(Protocol):
    """Anything with a prompt, a target and an optional image: ``Probe``, ``Sample``, ``EditFact``."""

    @property
    def prompt(self) -> str: ...
    @property
    def target(self) -> str: ...
    @property
    def image(self) -> ImageRef | None: ...


class ImageSource(Protocol):
    """Where a model opens its items' images: a benchmark's ``ImageStore``, or a stand-in for one."""

    def open(self, ref: ImageRef) -> Image.Image: ...


class LVLM:
    """A loaded model, its processor and its family; score, generate and locate edit sites.

    Build with ``LVLM.load(dir)`` (offline ``from_pretrained``) or ``LVLM(model, processor,
    family)`` from objects in memory. Items' images are opened from the store bound to the model
    (``load(..., images=)`` or ``bind_images``): a model meets one benchmark's images, so every
    scorer and editor reads them from here rather than being handed them on each call.
    """

    def __init__(self, model: nn.Module, processor: Any, family: str | Family) -> None:
        self.model = model.eval()  # scoring runs without dropout; methods switch modes themselves
        self.processor = processor
        self.family = _loading.family_named(family)
        self.layout = Layout(model, self.family.layout_spec)
        self.tokenizer = self.family.tokenizer(processor)
        if self.tokenizer.pad_token is None:  # batching needs a pad id; it is always masked out
            self.tokenizer.pad_token = self.tokenizer.eos_token
        #: The directory the model was loaded from (None when built in memory).
        self.source: Path | None = None
        #: Where items' images are opened from (None until bound: text-only items need none).
        self.images: ImageSource | None = None
        self._max_positions = _learned_positions(model)
        self.bind_scorer(CANONICAL)

    @classmethod
    def load(
        cls,
        path: str | Path,
        family: str | Family | None = None,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "cpu",
        allow_pickle: bool = False,
        trust_remote_code: bool = False,
        images: ImageSource | None = None,
    ) -> LVLM:
        """Load a saved HF model directory offline; the family is inferred from its config when not given.

        ``path`` may also name a bundled model (``"world"``), which loads from package data. Weights
        must be safetensors unless ``allow_pickle`` (pickle files can run code when loaded); the
        device and the weight files are checked before the model is built. A folder whose model is
        its own Python code (config.json's ``auto_map``) loads only with ``trust_remote_code``, which
        runs that code, and is driven as its ``mmke_model.yaml`` declares. ``images`` is bound as by
        ``bind_images``.
        """
        path = _loading.bundled_or_path(path)
        config = _loading.read_config(path, trust_remote_code)
        target = _loading.check_device(device, path)
        fam = _loading.resolve_family(family, config, path)
        processor = _loading.load_processor(fam, path)
        model = _loading.load_model(fam, config, path, dtype, target, allow_pickle)
        loaded = cls(model, processor, fam).bind_images(images)
        loaded.source = path
        return loaded

    def bind_images(self, images: ImageSource | None) -> Self:
        """Open items' images from ``images`` from now on (None: text-only items only); returns the model."""
        self.images = images
        return self

    def bind_scorer(self, scorer: Scorer) -> Self:
        """Write, label and score items as ``scorer``'s protocol does from now on; returns the model.

        One binding for everything: an edit trains on the same labels the protocol scores (VLKEB's
        FT trains on the target tokenised alone), so methods never see the choice.
        """
        self.scorer = scorer
        self.prompt_format = scorer.prompt_format(self.family.name)
        fmt = self.prompt_format.add_special_tokens
        # A chat template writes BOS itself; a plain format relies on the tokenizer adding it.
        self._add_special_tokens = not self.family.chat_template(self.processor) if fmt is None else fmt
        return self

    def __repr__(self) -> str:
        return f"LVLM(family={self.family.name!r}, model={type(self.model).__name__}, dtype={self.dtype})"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def image_token_id(self) -> int | None:
        """The id that marks image slots in ``input_ids`` (None when the family writes none)."""
        token = self.family.image_token(self.processor) if self.family.multimodal else None
        return None if token is None else int(self.tokenizer.convert_tokens_to_ids(token))

    # --- text -----------------------------------------------------------------------------

    def prompt_text(self, item: Item) -> str:
        """The model's input text up to where the answer starts."""
        return self.family.format_prompt(
            self.processor, item.prompt, item.image is not None, self.prompt_format
        )

    def full_text(self, item: Item) -> str:
        """Prompt and target as one text: the target follows the format's separator, else the
        family's ``answer_separator`` (by default one space unless whitespace is there)."""
        prefix = self.prompt_text(item)
        join = self.prompt_format.separator
        if join is None:
            join = self.family.answer_separator
        if join is None:
            join = "" if not prefix or prefix[-1].isspace() or item.target[:1].isspace() else " "
        return prefix + join + item.target

    # --- teacher forcing ------------------------------------------------------------------

    def encode(self, items: Sequence[Item]) -> Batch:
        """Tokenise prompt+target of each item (images processed once for the batch), right-padded."""
        pictures = self._pictures(items)
        texts = [self.full_text(it) for it in items]
        targets = [it.target for it in items]
        starts = [len(text) - len(t) for text, t in zip(texts, targets, strict=True)]  # answers' first chars
        enc = self._preprocess(texts, pictures, "right", starts)
        if self.prompt_format.target_alone:  # the papers' labels: the target tokenised on its own
            alone = [self.tokenizer(t, add_special_tokens=False).input_ids for t in targets]
            lengths = enc.inputs["attention_mask"].sum(dim=1).tolist()  # non-pad tokens (right padding)
            labels = tail_labels(lengths, enc.inputs["input_ids"].shape[1], alone, targets)  # (B, T)
        else:
            labels = answer_labels(enc, targets)  # (B, T)
        batch = Batch(enc.inputs, labels, tuple(texts), enc.offsets, tuple(enc.text_lengths))
        return batch.to(self.device, self.dtype)

    def logits(self, batch: Batch, answer_only: bool = True) -> torch.Tensor:
        """Answer-span logits (N, V), item-major in ``batch.answer_positions`` order; or all (B, T, V).

        For the answer span the lm head only sees the hidden states that predict answer tokens,
        so a batch never materialises (B, T, V). A batch whose items share their first
        ``batch.prefix`` tokens runs those once, as one row, and the rest per item on its cache.
        """
        if batch.prefix:
            return self._logits_after_prefix(batch, answer_only)
        if not answer_only:
            return self.family.forward(self.model, batch.inputs).logits  # (B, T, V)
        rows, cols = batch.answer_positions  # (N,), (N,)
        with _gather_lm_head_input(self.model.get_output_embeddings(), batch.labels.shape, rows, cols - 1):
            return self.family.forward(self.model, batch.inputs).logits  # (N, V)

    def _logits_after_prefix(self, batch: Batch, answer_only: bool) -> torch.Tensor:
        cut, inputs = batch.prefix, batch.inputs
        first, cache, which = self._run_prefix(inputs, cut, batch.prefix_rows)
        rest = {"input_ids": inputs["input_ids"][:, cut:], "attention_mask": inputs["attention_mask"]}
        if not answer_only:
            tail = self.family.forward(self.model, rest, cache=cache).logits  # (B, T - cut, V)
            return torch.cat([first.logits[which], tail], dim=1)  # (B, T, V)
        rows, cols = batch.answer_positions  # (N,), (N,)
        shape = torch.Size((batch.size, inputs["input_ids"].shape[1] - cut))
        with _gather_lm_head_input(self.model.get_output_embeddings(), shape, rows, cols - 1 - cut):
            return self.family.forward(self.model, rest, cache=cache).logits  # (N, V)

    def loss(self, batch: Batch) -> torch.Tensor:
        """Mean over items of each item's mean target NLL (differentiable; a scalar)."""
        logits = self.logits(batch)  # (N, V)
        nll = F.cross_entropy(logits.float(), batch.answer_labels, reduction="none")  # (N,)
        rows, _ = batch.answer_positions  # (N,)
        lengths = torch.tensor(batch.answer_lengths, dtype=nll.dtype, device=nll.device)  # (B,)
        per_item = torch.zeros_like(lengths).index_add(0, rows, nll) / lengths  # (B,)
        return per_item.mean()

    def score(self, items: Sequence[Item], *, batch_size: int = 32, topk: int = 10) -> ScoredBatch:
        """Token accuracy, exact match, NLL and top-k ids of each item, in input order, as the bound
        scorer defines them (which tokens are the target, what is kept; see ``mmke.models.scoring``)."""
        out: list[ItemScore | None] = [None] * len(items)
        with torch.inference_mode():
            for chunk in _chunks(self._by_length(items), batch_size):
                asked = [items[i] for i in chunk]
                batch = self.encode(asked)
                first_answer = batch.answer_mask.int().argmax(dim=1)  # (B,): its logit must follow a cut
                for group, cut, rows in self._prefix_plan(batch.inputs, first_answer - 1, asked):
                    part = batch if len(group) == len(asked) else self.encode([asked[i] for i in group])
                    if cut and _row_per_item(part.inputs):
                        part = replace(part, prefix=cut, prefix_rows=rows)
                    for i, s in zip(group, self.scorer.score_batch(self, part, topk), strict=True):
                        out[chunk[i]] = s
        return ScoredBatch(tuple(s for s in out if s is not None))

    # --- a shared prefix, computed once per image -----------------------------------------

    def _prefix_plan(
        self, inputs: dict[str, torch.Tensor], limits: torch.Tensor, items: Sequence[Item]
    ) -> list[tuple[list[int], int, tuple[int, ...]]]:
        """The batches to run right-padded ``inputs`` in: index lists into ``items``, each with the
        leading tokens its items share and a forward runs once per image, and per item the row its
        image runs in (``_shared_cut``; 0 and () for none). ``limits[b]``: the most tokens item b
        may share (every logit that is read must follow the cut). One batch, unless running the
        shared tokens once saves ``MIN_SAVED_TOKENS`` token positions and ``MIN_SAVED_SHARE`` of
        the batch's (IKE's demonstrations; a real model's hundreds of image tokens, shared by a
        case's probes of one image); then one batch of the items with an image and one of those
        without (their tokens line up only within each), each sharing its prefix where that saves
        as much."""
        everything = [(list(range(len(items))), 0, ())]
        if not self.family.reuses_prefix or len(items) < 2:
            return everything
        parts: dict[bool, list[int]] = {}
        for i, it in enumerate(items):
            parts.setdefault(it.image is not None, []).append(i)
        plan: list[tuple[list[int], int, tuple[int, ...]]] = []
        for group in parts.values():
            ids, mask = inputs["input_ids"][group], inputs["attention_mask"][group]  # (G, T) each
            cut, rows = self._shared_cut(ids, mask, int(limits[group].min()), [items[i] for i in group])
            saved = (len(group) - len(set(rows))) * cut  # token positions not run again
            worth = saved >= max(MIN_SAVED_TOKENS, int(mask.sum()) * MIN_SAVED_SHARE)
            plan.append((group, cut, rows) if worth else (group, 0, ()))
        return plan if any(cut for _, cut, _ in plan) else everything

    def _shared_cut(
        self, ids: torch.Tensor, mask: torch.Tensor, limit: int, items: Sequence[Item]
    ) -> tuple[int, tuple[int, ...]]:
        """How many leading tokens of right-padded ``ids`` (B, T) a forward can run once per image,
        and per item the row its image runs in (the first item with it): equal ids, or image slots
        in every item (filled by each item's own image), none of them padding, at most ``limit``,
        with every image token inside them (their states depend on the image); (0, ()) when
        nothing would be run fewer times."""
        image_id = self.image_token_id
        slot = ids == (image_id if image_id is not None else -1)  # (B, T)
        same = ((ids == ids[:1]).all(dim=0) | slot.all(dim=0)) & mask.bool().all(dim=0)  # (T,)
        cut = min(int(same.int().cumprod(0).sum()), limit)
        first: dict[ImageRef | None, int] = {}
        rows = tuple(first.setdefault(it.image, b) for b, it in enumerate(items))
        if cut < 1 or len(first) == len(items) or bool(slot[:, cut:].any()):
            return 0, ()
        return cut, rows

    def _run_prefix(
        self, inputs: dict[str, torch.Tensor], cut: int, rows: Sequence[int]
    ) -> tuple[Any, Any, torch.Tensor]:
        """The first ``cut`` tokens run once per distinct row of ``rows``: those outputs, their
        cache expanded to every item, and per item its row among the outputs (B,)."""
        runs = sorted(set(rows))  # one row per distinct image
        which = torch.tensor([runs.index(r) for r in rows], device=self.device)  # (B,)
        head = {k: v[runs, :cut] if k in TOKEN_INPUTS else v[runs] for k, v in inputs.items()}
        first = self.family.forward(self.model, head, cache=True)
        first.cache.batch_select_indices(which)
        return first, first.cache, which

    # --- generation -----------------------------------------------------------------------

    def generate(
        self,
        items: Sequence[Item],
        *,
        max_new_tokens: int = 16,
        batch_size: int = 32,
    ) -> list[str]:
        """Greedy continuations of each item's prompt (targets ignored): the new text only.

        Items that share leading tokens worth running once (``_prefix_plan``) decode from their
        cache, run once per image, as in ``score``."""
        out: list[str] = [""] * len(items)
        with torch.inference_mode():
            for chunk in _chunks(self._by_length(items), batch_size):
                asked = [items[i] for i in chunk]
                enc = self._preprocess([self.prompt_text(it) for it in asked], self._pictures(asked), "left")
                inputs = move_inputs(enc.inputs, self.device, self.dtype)
                ids, mask = _right_aligned(inputs["input_ids"], inputs["attention_mask"])
                aligned = {"input_ids": ids, "attention_mask": mask}
                for group, cut, rows in self._prefix_plan(aligned, mask.sum(dim=1) - 1, asked):
                    part = [asked[i] for i in group]
                    if cut:
                        texts = self._decode_shared(part, cut, rows, max_new_tokens)
                    else:
                        texts = self._decode_batch(
                            part, max_new_tokens, inputs if len(group) == len(asked) else None
                        )
                    for i, text in zip(group, texts, strict=True):
                        out[chunk[i]] = text
        return out

    def _decode_batch(
        self, items: Sequence[Item], max_new_tokens: int, inputs: dict[str, torch.Tensor] | None = None
    ) -> list[str]:
        """transformers' greedy decoding of ``items`` (left-padded; ``inputs`` when already built)."""
        if inputs is None:
            enc = self._preprocess([self.prompt_text(it) for it in items], self._pictures(items), "left")
            inputs = move_inputs(enc.inputs, self.device, self.dtype)
        new = self.family.generate(
            self.model,
            inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.tokenizer.pad_token_id,
        )  # (B, N)
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)

    def _decode_shared(
        self, items: Sequence[Item], cut: int, rows: tuple[int, ...], max_new_tokens: int
    ) -> list[str]:
        """Greedy decoding of ``items`` whose first ``cut`` tokens run once per image (``rows``, as
        ``_shared_cut`` gives them). The prompts are right-padded, so every item keeps positions
        0..n-1 and its new tokens take n, n+1, ... (explicit position ids skip the padding, which
        the attention mask hides), as when it is decoded alone."""
        enc = self._preprocess([self.prompt_text(it) for it in items], self._pictures(items), "right")
        inputs = move_inputs(enc.inputs, self.device, self.dtype)
        if not _row_per_item(inputs):
            return self._decode_batch(items, max_new_tokens)
        mask = inputs["attention_mask"]  # (B, T)
        lengths = mask.sum(dim=1)  # (B,)
        _, cache, _ = self._run_prefix(inputs, cut, rows)
        size, width = mask.shape
        stops = self._stop_ids()
        stop = torch.tensor(sorted(stops), device=self.device, dtype=torch.long)  # (S,)
        pad = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(stops, default=0)
        )
        rest = {
            "input_ids": inputs["input_ids"][:, cut:],
            "attention_mask": mask,
            "position_ids": torch.arange(cut, width, device=self.device).expand(size, -1),  # (B, T - cut)
        }
        logits = self.family.forward(self.model, rest, cache=cache).logits  # (B, T - cut, V)
        step = logits[torch.arange(size), lengths - 1 - cut]  # (B, V): after each item's last token
        new: list[torch.Tensor] = []
        done = torch.zeros(size, dtype=torch.bool, device=self.device)  # (B,)
        for n in range(max_new_tokens):
            token = step.argmax(dim=-1).masked_fill(done, pad)  # (B,)
            new.append(token)
            done |= torch.isin(token, stop)
            if bool(done.all()) or n == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)  # (B, T + n + 1)
            nxt = {
                "input_ids": token[:, None],
                "attention_mask": mask,
                "position_ids": (lengths + n)[:, None],
            }
            step = self.family.forward(self.model, nxt, cache=cache).logits[:, -1]  # (B, V)
        return self.tokenizer.batch_decode(torch.stack(new, dim=1), skip_special_tokens=True)

    def _stop_ids(self) -> set[int]:
        """The ids greedy decoding stops at: the generation config's end-of-sequence ids (one or a
        list), else the tokenizer's."""
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set() if eos is None else {int(e) for e in ([eos] if isinstance(eos, int) else eos)}

    # --- helpers --------------------------------------------------------------------------

    def _preprocess(
        self,
        texts: list[str],
        pictures: list[Image.Image | None],
        side: str,
        answer_starts: Sequence[int] | None = None,
    ) -> Encoded:
        """The family's inputs for ``texts``; ``answer_starts``: where each text's target begins
        (None: prompts alone, as for generation)."""
        enc = self.family.preprocess(
            self.processor, texts, pictures, side, self._add_special_tokens, answer_starts
        )
        limit = self._max_positions
        for i, n in enumerate(enc.inputs["attention_mask"].sum(dim=1).tolist()):
            if limit is not None and n > limit:  # the learned position table would index out of range
                raise BadRecordError(
                    f"item {i}: {n} tokens, more than the model's {limit} learned positions "
                    f"(a shorter prompt, or fewer IKE demonstrations: method_options.ike.k)"
                )
        return enc

    def _pictures(self, items: Sequence[Item]) -> list[Image.Image | None]:
        out: list[Image.Image | None] = []
        for i, it in enumerate(items):
            if it.image is None:
                out.append(None)
            elif not self.family.multimodal:
                raise ModalityError(
                    f"item {i}: has image {it.image.path!r} but {self.family.name} is text-only"
                )
            elif self.images is None:
                raise ModalityError(
                    f"item {i}: has image {it.image.path!r} but no image store is bound to the model "
                    "(LVLM.load(..., images=store) or model.bind_images(store))"
                )
            else:
                out.append(self.images.open(it.image))
        return out

    def _by_length(self, items: Sequence[Item]) -> list[int]:
        """Indices grouped image/text and sorted by text length, so batches pad little."""
        return sorted(range(len(items)), key=lambda i: (items[i].image is not None, len(items[i].prompt)))


#: Leading tokens shared by a batch's items run once per image when that saves this many token
#: positions, and this share of the batch's: enough to pay for the extra forward on the bundled
#: world model (about 500 of its tokens' work; its images are a few tokens, so only IKE's
#: demonstrations pass), far fewer than a real model's image takes (LLaVA-1.5: 576 tokens).
MIN_SAVED_TOKENS = 512
MIN_SAVED_SHARE = 0.5
#: The inputs that run along the tokens (cut with them); the others (pixels) belong to the image.
TOKEN_INPUTS = ("input_ids", "attention_mask")


def _learned_positions(model: nn.Module) -> int | None:
    """How many positions the language model's learned position table holds (OPT's
    ``embed_positions``, GPT-2's ``wpe``); None for rotary positions, which have no such limit."""
    for name, module in model.named_modules():
        if name.endswith(("embed_positions", "wpe")) and isinstance(module, nn.Embedding):
            return int(module.num_embeddings) - int(getattr(module, "offset", 0))
    return None


def _row_per_item(inputs: dict[str, torch.Tensor]) -> bool:
    """Whether every input besides the tokens (pixels, image sizes) has one row per item, so the
    rows of the items a prefix runs in can be taken from it."""
    size = inputs["input_ids"].shape[0]
    return all(v.shape[0] == size for k, v in inputs.items() if k not in TOKEN_INPUTS)


def _right_aligned(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``ids`` and ``mask`` (B, T) with each row's padding moved to its end."""
    pads = (mask == 0).int().cumprod(dim=1).sum(dim=1).tolist()  # leading pads per row
    rows = [(i.roll(-p), m.roll(-p)) for i, m, p in zip(ids, mask, pads, strict=True)]
    return torch.stack([i for i, _ in rows]), torch.stack([m for _, m in rows])


def _chunks(order: list[int], size: int) -> Iterator[list[int]]:
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    for start in range(0, len(order), size):
        yield order[start : start + size]


@contextmanager
def _gather_lm_head_input(
    head: nn.Module, shape: torch.Size, rows: torch.Tensor, cols: torch.Tensor
) -> Iterator[None]:
    """While active, the lm head sees only hidden[rows, cols] (N, D) instead of (B, T, D)."""

    def gather(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]  # (B, T, D)
        if tuple(hidden.shape[:2]) != tuple(shape):  # a model that re-lays out tokens before its head
            raise RuntimeError(
                f"lm head input {tuple(hidden.shape)} does not line up with tokens {tuple(shape)}"
            )
        return (hidden[rows, cols], *args[1:])  # (N, D)

    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()
