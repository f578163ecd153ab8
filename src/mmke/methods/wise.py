"""WISE: a side memory next to one MLP output projection, chosen per sequence by an activation router
(Wang et al. 2024, "WISE: Rethinking the Knowledge Memory for Lifelong Model Editing of Large Language
Models", NeurIPS 2024).

The adaptor wraps ``layout.mlp_out(layer)``. The wrapped Linear is the *main memory* and is never
changed; the *side memory* is a float32 copy of its weight that edits train. Our default layer is
the last one (like GRACE here); EasyEdit's WISE edits a middle-to-late layer's ``down_proj``
(e.g. layer 23 of LLaVA-OneVision-7B, 27 of LLaMA-2-7B), which large models should set.

Routing. A token's activation score is ``‖(W_side − W_main) a‖`` (a: the layer's input at that
token; the paper's Δ_act). WISE routes a whole query by its mean score over the tokens (EasyEdit's
``euc``); we make that decision causal: position t of a sequence reads the side memory when the
mean score over its valid (non-padding) positions 0..t exceeds ε, and otherwise gets the main
memory's output bit-identically. At the token that predicts the first answer token this is the
mean over the whole prompt (image tokens included), the query-level decision WISE makes; later
answer positions add the answer tokens before them. Being causal, the rule gives the same routing
to teacher-forced scoring (prompt+target in one pass) and cached generation (prompt, then one
token per call, carrying each sequence's score sum and count); a non-causal mean over the whole
sequence would let the target tokens change how the prompt is routed. To know which positions are
padding and whether a call continues a cached generation, the adaptor watches the language
model's ``attention_mask`` / cache with a forward pre-hook (removed with the adaptor). We tried a
running *maximum* too: shared template tokens (BOS, "USER:") then decide for every prompt, and
on the bundled world model text locality dropped.

Threshold. As in EasyEdit, ε = ``act_ratio`` × the smallest edit score seen by this side memory,
an edit's score Δ(x_e) being its mean score over the prompt tokens after training (what routes
its answer); every edit is therefore routed, and a prompt is only routed if it activates the side
memory nearly as strongly as the weakest edit.

Editing. The side memory trains for ``steps`` plain SGD steps (EasyEdit: ``edit_lr`` 1.0,
``n_iter`` 70) on the edit's target NLL (side memory used at every position, as EasyEdit does
while editing) plus WISE's routing margin with irrelevant inputs x_i:
``max(0, Δ(x_i) − α) + max(0, β − Δ(x_e)) + max(0, γ − (Δ(x_e) − Δ(x_i)))`` (α, β, γ = 5, 20, 10),
each hinge averaged over the irrelevant inputs (EasyEdit averages only the positive ones).
Δ(x_i) is the highest running mean over a whole irrelevant sequence (no position may route).
The irrelevant inputs are the train split's text and image locality probes, collected by
``train``; each edit takes ``n_irrelevant`` of them, rotating through the pool. Scores use the
layer's inputs only, which do not depend on the wrapped layer itself, so they are computed once
per edit and the margin costs no extra forward. Knowledge sharding: each edit updates only a
random ``mask_ratio`` share of the side memory's entries (seeded by ``seed`` and the edit's index
at the site); EasyEdit's SGD weight decay is left out so entries outside the shard stay exactly
as they were. After each step the side memory is clamped to ``norm_constraint`` around the main
memory, as in EasyEdit. The margins are absolute numbers tuned by the authors for 7B models,
and one SGD step moves a score by about lr × ‖a‖², so the right ``lr`` depends on the activation
scale: with EasyEdit's 1.0 the tiny and world models reach their edits but the margin hinges
oscillate instead of settling (irrelevant scores end far above α, on the world model sometimes
above ε); lr 0.3 with 50 steps settles them on the tiny models (the tests' setting) but fits
fewer world-model edits. On the world model (first 8 eval cases, defaults) 7/8 edits hold and
every text-locality probe is untouched, while image-locality probes that ask the edit's question
about a neighbouring entity's picture are mostly routed to the side memory.

Lifelong editing: a second edit at a site already wrapped trains the same side memory further;
each handle restores the side memory and ε as they were before its edit (reverse order), and the
last one puts the original module back. WISE's multiple side memories with TIES merging
(``save_freq`` / ``merge_freq``) and WISE-Retrieve are not implemented: there is one side memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from mmke.errors import ConfigError
from mmke.methods._irrelevant import locality_pool, usable_pool
from mmke.methods.base import (
    EditCollapsed,
    Edited,
    Editor,
    finite_loss,
    layer_io,
    swap_module,
    trainable_only,
)
from mmke.models.base import LVLM
from mmke.models.batch import Batch
from mmke.registry import register_method
from mmke.types import EditCase, Sample


@dataclass(frozen=True)
class WiseConfig:
    """WISE settings (EasyEdit's names in brackets): site, optimiser, router margins and sharding.

    ``steps`` [n_iter] and ``lr`` [edit_lr] drive plain SGD on the side memory; ``alpha``,
    ``beta``, ``gamma`` [act_margin] are the routing margins; ``act_ratio`` scales the smallest
    edit score into ε (EasyEdit 0.88 for LLMs); ``mask_ratio`` is the share of entries one edit
    may change; ``norm_constraint`` bounds |W_side − W_main| per entry (None: no bound);
    ``n_irrelevant`` is how many train locality probes each edit is pushed away from.
    """

    layer: int = -1
    steps: int = 70
    lr: float = 1.0
    mask_ratio: float = 0.2
    act_ratio: float = 0.88
    alpha: float = 5.0
    beta: float = 20.0
    gamma: float = 10.0
    norm_constraint: float | None = 1.0
    n_irrelevant: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 < self.mask_ratio <= 1, f"mask_ratio must be in (0, 1], got {self.mask_ratio}"),
            (0 < self.act_ratio < 1, f"act_ratio must be in (0, 1), got {self.act_ratio}"),
            (self.alpha >= 0, f"alpha must be >= 0, got {self.alpha}"),
            (self.beta > self.alpha, f"beta must be > alpha ({self.alpha}), got {self.beta}"),
            (self.gamma >= 0, f"gamma must be >= 0, got {self.gamma}"),
            (self.n_irrelevant >= 1, f"n_irrelevant must be >= 1, got {self.n_irrelevant}"),
        ]
        if self.norm_constraint is not None:
            bound = self.norm_constraint
            checks.append((bound > 0, f"norm_constraint must be > 0 or null, got {bound}"))
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"wise {message}")


@dataclass(frozen=True)
class Tokens:
    """What the language model is called with: token shape, 2-D attention mask, cached continuation."""

    batch: int
    length: int
    mask: torch.Tensor | None  # (B, past + T) or None
    continuing: bool


class WiseAdaptor(nn.Module):
    """Wraps a Linear (the main memory) with a side memory and the activation router.

    ``side`` (O, I) and ``eps`` are plain attributes, not parameters or buffers, so the model's
    state dict holds only the wrapped layer. ``live`` is the side weight being trained during an
    edit: then every position reads it. ``tokens`` is set by the language-model pre-hook before
    each forward; ``carry`` is each sequence's score sum and valid-token count after the last call,
    for cached generation.
    """

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.layer = layer
        # the side memory an edit trained (O, I); until then the layer's own weight stands for it,
        # so the first edit holds one copy of the weight, not two (172 MB at a 7B model's width)
        self.own: torch.Tensor | None = None
        self.eps = math.inf  # nothing routes before the first edit
        self.live: torch.Tensor | None = None
        self.tokens: Tokens | None = None
        self.carry: tuple[torch.Tensor, torch.Tensor] | None = None  # score sums (B,), counts (B,)
        self.watch: RemovableHandle | None = None
        self.edits: list[WiseEdited] = []  # live handles, oldest first

    @property
    def side(self) -> torch.Tensor:
        """The side memory (O, I), float32: the wrapped layer's weight until an edit trains its own."""
        return self.layer.weight.detach().float() if self.own is None else self.own

    @side.setter
    def side(self, value: torch.Tensor) -> None:
        self.own = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.live is not None:  # editing: the side memory everywhere, as EasyEdit trains it
            return F.linear(x, self.live.to(x.dtype), self.layer.bias)
        out = self.layer(x)  # (..., O)
        if math.isinf(self.eps):
            return out
        route = self._route(x)  # x's leading shape
        if not bool(route.any()):
            return out
        side = F.linear(x, self.side.to(x.dtype), self.layer.bias)  # (..., O)
        return torch.where(route[..., None], side, out)

    def scores(self, x: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        """Activation score ‖(W_side − W_main) a‖ of each input row (..., I) -> (...), in float32."""
        weight = self.side if side is None else side  # (O, I)
        delta = weight - self.layer.weight.float()  # (O, I)
        return torch.linalg.vector_norm(x.float() @ delta.T, dim=-1)

    def _route(self, x: torch.Tensor) -> torch.Tensor:
        """Whether each position reads the side memory: running mean of valid scores > eps."""
        seqs, valid, continuing = self._sequences(x)  # (B, T, I), (B, T)
        carry = self.carry if continuing and _fits(self.carry, seqs.shape[0]) else None
        running, self.carry = running_mean(self.scores(seqs), valid, carry)  # (B, T)
        return (running > self.eps).reshape(x.shape[:-1])

    def _sequences(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """x as sequences (B, T, I), which positions are real tokens (B, T), and whether cached."""
        seen = self.tokens
        if seen is not None and x.shape[:-1].numel() == seen.batch * seen.length:
            seqs = x.reshape(seen.batch, seen.length, -1)  # also OPT's flattened (B*T, I)
            if seen.mask is not None and seen.mask.shape[1] >= seen.length:
                return seqs, seen.mask[:, -seen.length :].bool(), seen.continuing
            return seqs, torch.ones(seqs.shape[:2], dtype=torch.bool, device=x.device), seen.continuing
        # no call seen (module used on its own): each leading row is one sequence, all real tokens
        seqs = x.reshape(-1, *x.shape[-2:]) if x.dim() > 2 else x[None]
        return seqs, torch.ones(seqs.shape[:2], dtype=torch.bool, device=x.device), False


def running_mean(
    scores: torch.Tensor, valid: torch.Tensor, carry: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Mean score over each sequence's valid positions up to t (B, T), and the sums and counts to
    continue from (cached generation). Padding counts for nothing; a row with none yet scores 0.
    """
    total = (scores * valid).cumsum(dim=1)  # (B, T)
    count = valid.to(scores.dtype).cumsum(dim=1)  # (B, T)
    if carry is not None:
        total, count = total + carry[0][:, None], count + carry[1][:, None]
    return total / count.clamp_min(1), (total[:, -1], count[:, -1])


def _fits(carry: tuple[torch.Tensor, torch.Tensor] | None, batch: int) -> bool:
    return carry is not None and carry[0].shape[0] == batch


def _note_tokens(adaptor: WiseAdaptor) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
    """A forward pre-hook for the language model that tells the adaptor about the current call."""

    def note(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids")
        first = ids if ids is not None else kwargs.get("inputs_embeds")
        if first is None and args and isinstance(args[0], torch.Tensor):
            first = args[0]
        if first is None:
            adaptor.tokens = None
            return
        batch, length = int(first.shape[0]), int(first.shape[1])
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None  # (B, past + T)
        cache = kwargs.get("past_key_values")
        cached = cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0
        # a cached step of generation: the mask (when given, it is dropped without padding) or the
        # cache shows earlier tokens
        continuing = cached or (mask is not None and mask.shape[1] > length)
        adaptor.tokens = Tokens(batch, length, mask, continuing)

    return note


class WiseEdited(Edited):
    """A WISE edit: restore puts the side memory and ε back as before it (and the original module,
    when it was the first edit at this site). Live edits at one site restore in reverse order.
    """

    def __init__(
        self,
        model: LVLM,
        site: str,
        adaptor: WiseAdaptor,
        before: tuple[torch.Tensor | None, float],
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(model, details)
        self.site = site
        self.adaptor = adaptor
        self.before = before
        adaptor.edits.append(self)

    @property
    def edited_params(self) -> int:
        """Size of the side memory (one weight matrix of the wrapped layer)."""
        return self.adaptor.side.numel()

    def _release(self) -> None:
        if self.adaptor.edits[-1] is not self:
            raise RuntimeError(f"wise: restore the later edits at {self.site} first (reverse order)")
        self.adaptor.edits.pop()
        self.adaptor.own, self.adaptor.eps = self.before
        if not self.adaptor.edits:
            _unwrap(self.model, self.site, self.adaptor)


@register_method("wise")
class Wise(Editor[WiseConfig]):
    """WISE: a routed side memory on one MLP output projection; lifelong edits share it."""

    name = "wise"
    defaults = WiseConfig()
    batches = True

    def __init__(self, config: WiseConfig | dict[str, Any] | None = None) -> None:
        super().__init__(config)
        self.irrelevant: tuple[Sample, ...] | None = None  # set by train

    @property
    def needs_train_cases(self) -> bool:
        return True

    def train(self, model: LVLM, train_cases: Sequence[EditCase]) -> None:
        """Keep the train split's locality probes (text, and image ones the model can take)."""
        self.irrelevant = locality_pool(model, train_cases)

    def apply(self, model: LVLM, case: EditCase) -> WiseEdited:
        return self.apply_many(model, [case])

    def apply_many(self, model: LVLM, cases: Sequence[EditCase]) -> WiseEdited:
        """Every case's edit trained into one shard of the side memory at once; each must route."""
        pool = self._pool(model)
        site = model.layout.mlp_out(self.config.layer)
        adaptor = _adaptor_at(model, site)
        before = (adaptor.own, adaptor.eps)
        try:
            details = self._edit(model, adaptor, cases, pool)
        except BaseException:  # collapsed, interrupted or failed: leave the model as it was
            adaptor.own, adaptor.eps = before
            if not adaptor.edits:
                _unwrap(model, site, adaptor)
            raise
        return WiseEdited(model, site, adaptor, before, details)

    def _pool(self, model: LVLM) -> tuple[Sample, ...]:
        return usable_pool(model, self.irrelevant, self.name, "WISE needs them as irrelevant inputs")

    def _edit(
        self,
        model: LVLM,
        adaptor: WiseAdaptor,
        cases: Sequence[EditCase],
        pool: tuple[Sample, ...],
    ) -> dict[str, Any]:
        """Train the side memory on the edits, then lower ε so that each routes; returns the details."""
        cfg, index = self.config, len(adaptor.edits)
        batch = model.encode([c.edit for c in cases])
        prompt = _prompt_inputs(model, adaptor, batch)  # per edit (n_b, I)
        chosen = _pick(pool, cfg.n_irrelevant, index)
        far = _sequence_inputs(model, adaptor, model.encode(chosen))  # k x (n_i, I)
        mask = _shard(adaptor.side.shape, cfg.mask_ratio, cfg.seed + index, adaptor.side.device)
        losses, side = self._train_side(model, adaptor, batch, prompt, far, mask)
        edit_score = float(_edit_scores(adaptor, prompt, side).detach().min())
        far_score = max(float(_far_score(adaptor, x, side).detach()) for x in far)
        adaptor.side, adaptor.eps = side, min(adaptor.eps, cfg.act_ratio * edit_score)
        return {
            "losses": losses,
            "steps": len(losses),
            "edit_score": edit_score,
            "irrelevant_score": far_score,
            "eps": adaptor.eps,
            "shard": float(mask.float().mean()),
        }

    def _train_side(
        self,
        model: LVLM,
        adaptor: WiseAdaptor,
        batch: Batch,
        prompt: list[torch.Tensor],
        far: list[torch.Tensor],
        mask: torch.Tensor,
    ) -> tuple[list[float], torch.Tensor]:
        """Masked SGD on NLL + routing margin; returns the losses and the trained side (O, I)."""
        cfg = self.config
        main = adaptor.layer.weight.detach().float()  # (O, I)
        live = adaptor.side.clone().requires_grad_(True)  # (O, I)
        losses: list[float] = []
        adaptor.live = live
        try:
            with trainable_only(model.model, {}), torch.enable_grad():
                for step in range(cfg.steps):
                    loss = model.loss(batch) + self._margin(adaptor, live, prompt, far)
                    losses.append(finite_loss(float(loss.detach()), step, self.name))
                    (grad,) = torch.autograd.grad(loss, live)
                    with torch.no_grad():
                        live -= cfg.lr * grad * mask  # only this edit's shard moves
                        _clamp(live, main, cfg.norm_constraint)
        finally:
            adaptor.live = None
        if not bool(torch.isfinite(live).all()):  # the last update is never seen by a loss
            raise EditCollapsed(f"wise: side memory became non-finite at step {cfg.steps}", cfg.steps)
        return losses, live.detach()

    def _margin(
        self, adaptor: WiseAdaptor, live: torch.Tensor, prompt: list[torch.Tensor], far: list[torch.Tensor]
    ) -> torch.Tensor:
        """WISE's routing loss: irrelevant scores below alpha, each edit's above beta, apart by gamma."""
        cfg = self.config
        edit = _edit_scores(adaptor, prompt, live)  # (K,): what routes each answer
        irrelevant = torch.stack([_far_score(adaptor, x, live) for x in far])  # (k,)
        return (
            F.relu(irrelevant - cfg.alpha).mean()
            + F.relu(cfg.beta - edit).mean()
            + F.relu(cfg.gamma - (edit[:, None] - irrelevant[None])).mean()
        )


def _edit_scores(adaptor: WiseAdaptor, prompts: list[torch.Tensor], side: torch.Tensor) -> torch.Tensor:
    """Δ(x_e) per edit (K,): the mean score over its prompt tokens (n, I), what routes its answer."""
    return torch.stack([adaptor.scores(prompt, side).mean() for prompt in prompts])


def _far_score(adaptor: WiseAdaptor, tokens: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """Δ(x_i): the highest running mean over an irrelevant sequence (n, I): no position may route."""
    scores = adaptor.scores(tokens, side)[None]  # (1, n)
    running, _ = running_mean(scores, torch.ones_like(scores, dtype=torch.bool))  # (1, n)
    return running.max()


def _clamp(live: torch.Tensor, main: torch.Tensor, bound: float | None) -> None:
    """EasyEdit's norm constraint: every entry within ``bound`` of the main memory's (in place)."""
    if bound is not None:
        torch.clamp_(live, min=main - bound, max=main + bound)


def _shard(shape: torch.Size, ratio: float, seed: int, device: torch.device) -> torch.Tensor:
    """A random 0/1 mask (O, I) with about ``ratio`` ones, the same for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=gen) < ratio).float().to(device)


def _pick(pool: tuple[Sample, ...], k: int, index: int) -> list[Sample]:
    """k irrelevant inputs for the index-th edit at a site: consecutive edits rotate through the pool."""
    k = min(k, len(pool))
    start = (index * k) % len(pool)
    return [pool[(start + i) % len(pool)] for i in range(k)]


def _adaptor_at(model: LVLM, site: str) -> WiseAdaptor:
    """The adaptor already at ``site`` (lifelong editing), or a new one swapped in and watching."""
    module = model.layout.module(site)
    if isinstance(module, WiseAdaptor):
        return module
    if not isinstance(module, nn.Linear):
        raise ConfigError(f"wise wraps a Linear; {site} is a {type(module).__name__}")
    adaptor = WiseAdaptor(module)
    text_model, _, _ = model.layout.layer(0).rpartition(".")[0].rpartition(".")  # owner of the layers
    adaptor.watch = model.layout.module(text_model).register_forward_pre_hook(
        _note_tokens(adaptor), with_kwargs=True
    )
    swap_module(model.model, site, adaptor)
    return adaptor


def _unwrap(model: LVLM, site: str, adaptor: WiseAdaptor) -> None:
    """Put the original layer back and stop watching the language model."""
    swap_module(model.model, site, adaptor.layer)
    if adaptor.watch is not None:
        adaptor.watch.remove()
        adaptor.watch = None
    adaptor.tokens = adaptor.carry = None


def _prompt_inputs(model: LVLM, adaptor: WiseAdaptor, batch: Batch) -> list[torch.Tensor]:
    """Per edit, the wrapped layer's inputs (n, I) at its prompt tokens, up to the one predicting it."""
    rows, cols = batch.answer_positions  # (N,), (N,)
    x, _ = layer_io(model, adaptor.layer, batch)  # (B, T, I), right-padded: prompts start at 0
    # the first answer token of each edit; the token before it predicts it
    return [x[b, : int(cols[rows == b].min())].float() for b in range(x.shape[0])]


def _sequence_inputs(model: LVLM, adaptor: WiseAdaptor, batch: Batch) -> list[torch.Tensor]:
    """The wrapped layer's inputs at every real token of each sequence: B x (n_b, I)."""
    x, _ = layer_io(model, adaptor.layer, batch)  # (B, T, I)
    valid = batch.inputs["attention_mask"].bool()  # (B, T)
    return [x[b, valid[b]].float() for b in range(x.shape[0])]
