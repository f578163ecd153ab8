"""LiveEdit: a trained generator turns each edit into a low-rank expert on one decoder layer's output;
experts are filtered hard by the input's image and mixed softly by its text (Chen et al. 2025,
"Lifelong Knowledge Editing for Vision Language Models with Low-Rank Mixture-of-Experts", CVPR 2025;
code qizhou000/LiveEdit, ``editor/vllm_editors/liveedit``).

Representations. Everything reads the output of decoder layer ``layer`` (``layout.layer``; the
reference edits layer 21 of 32, our default is the second to last) on the unedited model: the
image tokens' states (*vision*), the prompt tokens after the image up to the one that predicts the
answer (*query*) and the answer tokens' states (*answer*), cut apart by the image token id and the
answer labels. These states depend only on tokens at or before them, so an item's routing never
depends on its target: scoring and generation route it alike.

Editing (``apply``). The edit sample's representations give, through the trained networks, a
visual key (learned slots read the query, then the image; ``extract_vision``), a textual key
(slots read the query) and an expert: two ``rank`` x D matrices ``C`` and ``R`` that ``rank``
learned vectors read from the edit's vision, query and answer states by cross-attention
(``LowRankGenerator``). An expert adds ``relu(LN(h) Cᵀ) R`` to the layer's output ``h`` at every
position. The expert and its keys join a memory held by a wrapper swapped in for that layer.

Inference. Per item: an expert survives the *hard visual filter* when the item's visual key is
closer to the edit's than to the one extracted from a learned prototype image; the survivors are
mixed with ``softmax(s) · sigmoid(s)`` of the textual similarity ``s`` (soft routing). An item no
expert survives for runs the unedited layer: its output is bit-identical. Routed items are scored
one at a time with their own mixture (the mixture is per item, as in the reference, which edits
and scores with batch size 1); the rest run batched and untouched.

Meta-training (``meta_loss``), as the reference trains it: per case the edit (reliability), one
probe of each generality kind and one routable locality probe; each row is scored with a mixture
of its own expert (locality rows: at random) and a random share of the batch's other experts,
weighted by soft routing: NLL of the in-scope rows, KL to the unedited model on the locality rows;
plus the soft-routing loss (softmax over the batch's edits picks the own edit; sigmoid positive
for the own edit, negative for other edits) and the hard-routing losses (softmax over the batch's
visual keys and the prototype picks the own edit for in-scope rows and the prototype for the
locality rows). All lambdas default to the reference's 1.

Differences from the reference, and why:
- One extractor for inputs and edits (the reference trains an ``inpt_extractor`` and an
  ``edit_extractor``) and cosine similarities with learned scales (the reference: dot products
  scaled by 1/sqrt(module_dim)). An edit's own sample then matches its keys exactly (cosine 1),
  so it always passes its visual filter and gets the largest textual weight, also for an editor
  trained briefly.
- The textual similarity has a learned bias: ``sigmoid(s)`` is then a real "same question" gate.
  The reference has no bias and no textual gate; we use one where there is no image to filter
  by (below).
- The hard-routing loss also gets a logistic term on the filter's own decision (own edit above
  the prototype, other cases' edits and look-alike locality images below it): the reference's
  softmax terms do not by themselves put every other edit below the prototype, which the filter
  needs, as it keeps each expert on its own.
- The prototype has ``prototype_tokens`` learned states (the reference: one per image token of
  the model); they are only keys of a cross-attention, so any number works for every family.
- Items without an image are never routed to an edit with one (the reference: text-only inputs
  skip the experts, which is why its text locality is perfect). Text-only edits (and every edit on
  the text-only family ``causal_lm``) have no visual key: no visual filter, they are routed by
  text alone, an item taking the expert when ``sigmoid(s) > 0.5``.
- Lifelong editing: each ``apply`` appends to the wrapper's memory and its handle removes what it
  added (newest first); the last one puts the original layer back. ``apply_many`` generates K
  experts at once and adds them together under one handle (the reference edits one at a time).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from mmke.errors import ConfigError
from mmke.methods.base import EditCollapsed, RoutedEdited, layer_output, swap_module
from mmke.methods.trainable import TrainableEditor, TrainingConfig
from mmke.models.base import LVLM, Item
from mmke.models.batch import Batch
from mmke.registry import register_method
from mmke.types import EditCase, ProbeKind

#: Probes that ask the edited fact in other words or with another view (besides the edit itself).
GENERALITY_KINDS = (
    ProbeKind.TEXT_GENERALITY,
    ProbeKind.IMAGE_GENERALITY,
    ProbeKind.TEXT_RELIABILITY,
    ProbeKind.IMAGE_RELIABILITY,
)
LOCALITY_KINDS = (ProbeKind.TEXT_LOCALITY, ProbeKind.IMAGE_LOCALITY)
EDIT, GENERAL, LOCAL = "edit", "generality", "locality"


@dataclass(frozen=True)
class LiveEditConfig(TrainingConfig):
    """LiveEdit settings (the reference's names in brackets).

    ``layer`` [edit_layer_i] is the decoder layer whose output the experts add to; ``module_dim``
    and ``heads`` [cross_att_head_n] size the cross-attentions; ``rank`` [lora_rank] and
    ``lora_scale`` shape each expert; ``slots`` [eqe_n] is how many vectors a key has;
    ``prototype_tokens`` the learned prototype image's length; ``share`` the chance that another
    edit's expert joins a training row's mixture; the ``*_lambda`` weigh the losses [train_cfg].
    The reference trains LLaVA-1.5-7B with module_dim 1024, 8 heads, rank 4, 4 slots, lr 1e-4;
    the defaults here suit the bundled world model (hidden size 192). The shipped world editor
    (700 cosine-decayed steps, about 8 minutes on 2 busy CPU cores) is undertrained: on the first
    24 eval cases reliability 29% token accuracy (unedited 12.5%), T-Loc 100%, I-Loc 94%; the
    training NLL was still falling, so more steps should help.
    """

    layer: int = -2
    module_dim: int = 128
    heads: int = 4
    rank: int = 4
    lora_scale: float = 5.0
    slots: int = 4
    prototype_tokens: int = 16
    share: float = 0.5
    rel_lambda: float = 1.0
    gen_lambda: float = 1.0
    loc_lambda: float = 1.0
    soft_lambda: float = 1.0
    hard_lambda: float = 1.0
    train_steps: int = 3000
    train_batch: int = 8
    train_lr: float = 3e-3
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        super().__post_init__()
        sizes = (self.module_dim, self.heads, self.rank, self.slots, self.prototype_tokens)
        if min(sizes) < 1:
            raise ConfigError("liveedit module_dim, heads, rank, slots and prototype_tokens must be >= 1")
        if self.module_dim % self.heads:
            raise ConfigError(f"liveedit heads ({self.heads}) must divide module_dim ({self.module_dim})")
        if not self.lora_scale > 0:
            raise ConfigError(f"liveedit lora_scale must be > 0, got {self.lora_scale}")
        if not 0.0 <= self.share <= 1.0:
            raise ConfigError(f"liveedit share must be in [0, 1], got {self.share}")
        lambdas = (self.rel_lambda, self.gen_lambda, self.loc_lambda, self.soft_lambda, self.hard_lambda)
        if min(lambdas) < 0:
            raise ConfigError("liveedit loss weights (*_lambda) must be >= 0")


# --- networks -----------------------------------------------------------------------------


@dataclass
class Reps:
    """A padded set of states per row: ``x`` (N, L, D) and which of them are real, ``mask`` (N, L)."""

    x: torch.Tensor
    mask: torch.Tensor

    def rows(self, index: torch.Tensor) -> Reps:
        return Reps(self.x[index], self.mask[index])


class CrossAttention(nn.Module):
    """Multi-head attention of queries (N or 1, Q, q_dim) over masked keys (N, L, kv_dim) -> (N, Q, v_dim)."""

    def __init__(self, q_dim: int, kv_dim: int, dim: int, v_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(q_dim, dim)
        self.k = nn.Linear(kv_dim, dim)
        self.v = nn.Linear(kv_dim, v_dim)

    def forward(self, queries: torch.Tensor, keys: Reps) -> torch.Tensor:
        n, length, _ = keys.x.shape
        h = self.heads
        q = self.q(queries).expand(n, -1, -1).reshape(n, queries.shape[1], h, -1)  # (N, Q, H, d)
        k = self.k(keys.x).reshape(n, length, h, -1)  # (N, L, H, d)
        v = self.v(keys.x)  # (N, L, V)
        v = v.reshape(n, length, h, v.shape[-1] // h)  # (N, L, H, V/H)
        scores = torch.einsum("nqhd,nlhd->nqlh", q, k) / math.sqrt(q.shape[-1])  # (N, Q, L, H)
        scores = scores.masked_fill(~keys.mask[:, None, :, None], float("-inf"))
        out = torch.einsum("nqlh,nlhv->nqhv", scores.softmax(dim=2), v)  # (N, Q, H, V/H)
        return out.reshape(n, queries.shape[1], -1)  # (N, Q, V)


class Extractor(nn.Module):
    """Keys of an item or an edit (the reference's ``QVExtractor``): a visual key (slots read the
    query, then the image) and a textual key (slots read the query), each (N, S, module_dim)."""

    def __init__(self, width: int, cfg: LiveEditConfig) -> None:
        super().__init__()
        dim, heads = cfg.module_dim, cfg.heads
        self.norm_v = nn.LayerNorm(width)
        self.slots_v = nn.Parameter(nn.init.kaiming_normal_(torch.empty(1, cfg.slots, dim)))
        self.ask = CrossAttention(dim, width, dim, dim, heads)
        self.look = CrossAttention(dim, width, dim, dim, heads)
        self.norm_t = nn.LayerNorm(width)
        self.slots_t = nn.Parameter(nn.init.kaiming_normal_(torch.empty(1, cfg.slots, dim)))
        self.read = CrossAttention(dim, width, dim, dim, heads)
        self.prototype = nn.Parameter(nn.init.kaiming_normal_(torch.empty(1, cfg.prototype_tokens, width)))

    def visual(self, query: Reps, vision: Reps) -> torch.Tensor:
        asked = self.ask(self.slots_v, Reps(self.norm_v(query.x), query.mask))  # (N, S, dim)
        return self.look(asked, Reps(self.norm_v(vision.x), vision.mask))  # (N, S, dim)

    def prototype_visual(self, query: Reps) -> torch.Tensor:
        """The visual key the query reads from the learned prototype image (N, S, dim)."""
        n = query.x.shape[0]
        proto = self.prototype.expand(n, -1, -1)  # (N, P, D)
        mask = torch.ones(proto.shape[:2], dtype=torch.bool, device=proto.device)
        return self.visual(query, Reps(proto, mask))

    def textual(self, query: Reps) -> torch.Tensor:
        return self.read(self.slots_t, Reps(self.norm_t(query.x), query.mask))  # (N, S, dim)


class Generator(nn.Module):
    """``rank`` learned vectors read one expert matrix (N, rank, D) from an edit's states
    (the reference's ``LowRankGenerator``)."""

    def __init__(self, width: int, cfg: LiveEditConfig) -> None:
        super().__init__()
        self.phi = nn.Parameter(nn.init.kaiming_normal_(torch.empty(1, cfg.rank, cfg.module_dim)))
        self.norm = nn.LayerNorm(width)
        self.attend = CrossAttention(cfg.module_dim, width, cfg.module_dim, width, cfg.heads)
        self.scale = 1 / (cfg.lora_scale * math.sqrt(cfg.rank))

    def forward(self, reps: Reps) -> torch.Tensor:
        return self.attend(self.phi, Reps(self.norm(reps.x), reps.mask)) * self.scale  # (N, r, D)


class LiveEditNets(nn.Module):
    """What LiveEdit trains and saves: the extractor, the two generators, the experts' input norm and
    the similarity scales (visual, textual) and textual bias."""

    def __init__(self, width: int, cfg: LiveEditConfig) -> None:
        super().__init__()
        self.extractor = Extractor(width, cfg)
        self.down = Generator(width, cfg)  # C: what an expert reacts to
        self.up = Generator(width, cfg)  # R: what it adds
        self.norm = nn.LayerNorm(width)
        self.log_scales = nn.Parameter(torch.full((2,), math.log(10.0)))
        self.text_bias = nn.Parameter(torch.tensor(-5.0))

    def visual_sim(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.log_scales[0].exp() * slot_cosine(a, b)

    def visual_sim_rows(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``visual_sim`` of each row of a (N, S, d) with the same row of b (N, S, d) only: (N,)."""
        cos = (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1).mean(-1)  # (N,)
        return self.log_scales[0].exp() * cos

    def text_sim(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.log_scales[1].exp() * slot_cosine(a, b) + self.text_bias


def slot_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over slots of the cosine of corresponding slots: (N, S, d), (M, S, d) -> (N, M)."""
    return torch.einsum("nsd,msd->nm", F.normalize(a, dim=-1), F.normalize(b, dim=-1)) / a.shape[1]


def mixing_weights(sim: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Soft routing over the kept experts: softmax(s) · sigmoid(s) of the textual similarity (N, M)."""
    relative = sim.masked_fill(~keep, -1e4).softmax(dim=1)  # (N, M)
    return relative * sim.sigmoid() * keep


def expert_residual(
    h: torch.Tensor, norm: nn.Module, down: torch.Tensor, up: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Σ_m w_m relu(LN(h) C_mᵀ) R_m per row: h (B, T, D), C and R (M, r, D), weights (B, M) -> (B, T, D)."""
    x = norm(h.float())  # (B, T, D)
    act = torch.relu(torch.einsum("btd,mrd->btmr", x, down))  # (B, T, M, r)
    return torch.einsum("btmr,mrd,bm->btd", act, up, weights).to(h.dtype)


# --- reading the layer ----------------------------------------------------------------------


@dataclass
class Parts:
    """One encoded batch's states at the edit layer, cut per row into vision, query and answer."""

    vision: Reps
    query: Reps
    content: Reps  # vision, query and answer states: what an expert is generated from
    has_image: torch.Tensor  # (B,)


def read_layer(
    model: LVLM, site: str, batch: Batch, *, logits: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The unedited output of layer ``site`` (B, T, D), and with ``logits`` the answer-span logits (N, V)."""
    if not logits:
        return layer_output(model, _inner(model, site), batch), None
    seen: dict[str, torch.Tensor] = {}

    def grab(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        seen["h"] = (out[0] if isinstance(out, tuple) else out).detach()

    handle = _inner(model, site).register_forward_hook(grab)
    try:
        with torch.no_grad():
            out = model.logits(batch)  # (N, V)
    finally:
        handle.remove()
    hidden = seen["h"]
    if tuple(hidden.shape[:2]) != tuple(batch.labels.shape):
        raise RuntimeError(
            f"layer output {tuple(hidden.shape)} does not line up with tokens {tuple(batch.labels.shape)}"
        )
    return hidden, out


def split_parts(model: LVLM, batch: Batch, hidden: torch.Tensor) -> Parts:
    """Cut each row's states (B, T, D) into its image tokens, its query (prompt tokens after the image
    up to the one predicting the answer; all non-image prompt tokens when none follow the image)
    and its answer tokens."""
    ids = batch.inputs["input_ids"]  # (B, T)
    valid = batch.inputs.get("attention_mask", torch.ones_like(ids)).bool()  # (B, T)
    image_id = model.image_token_id
    vision = (ids == image_id) & valid if image_id is not None else torch.zeros_like(valid)  # (B, T)
    answer = batch.answer_mask  # (B, T)
    t = torch.arange(ids.shape[1], device=ids.device)  # (T,)
    prompt = valid & (t[None] < answer.int().argmax(dim=1, keepdim=True))  # (B, T)
    last_image = torch.where(vision, t[None], -1).amax(dim=1, keepdim=True)  # (B, 1)
    query = prompt & (t[None] > last_image)  # (B, T)
    empty = ~query.any(dim=1, keepdim=True)  # (B, 1)
    query = torch.where(empty, prompt & ~vision, query)
    x = hidden.float()
    return Parts(_pack(x, vision), _pack(x, query), _pack(x, vision | query | answer), vision.any(dim=1))


def _pack(x: torch.Tensor, select: torch.Tensor) -> Reps:
    """The selected states of each row (B, T, D) with (B, T) packed left: Reps (B, L, D)."""
    counts = select.sum(dim=1)  # (B,)
    width = max(int(counts.max()), 1) if counts.numel() else 1
    order = torch.argsort((~select).int(), dim=1, stable=True)[:, :width]  # selected positions first
    picked = torch.gather(x, 1, order[..., None].expand(-1, -1, x.shape[-1]))  # (B, L, D)
    mask = torch.arange(width, device=x.device)[None] < counts[:, None]  # (B, L)
    return Reps(picked, mask)


@dataclass
class Keys:
    """Routing keys of N items or edits: textual (N, S, d), visual (N, S, d; zeros where no image),
    the similarity of the visual key to the prototype's (N,) and which have an image (N,)."""

    text: torch.Tensor
    visual: torch.Tensor
    prototype: torch.Tensor
    has_image: torch.Tensor

    @staticmethod
    def cat(parts: Sequence[Keys]) -> Keys:
        return Keys(
            *(torch.cat([getattr(p, f) for p in parts]) for f in ("text", "visual", "prototype", "has_image"))
        )

    def rows(self, index: torch.Tensor) -> Keys:
        return Keys(self.text[index], self.visual[index], self.prototype[index], self.has_image[index])


def keys_of(nets: LiveEditNets, parts: Parts) -> Keys:
    ext = nets.extractor
    text = ext.textual(parts.query)  # (B, S, d)
    has = parts.has_image
    visual = torch.zeros_like(text)
    proto = torch.zeros(text.shape[0], device=text.device)
    if bool(has.any()):
        query, vision = parts.query.rows(has), parts.vision.rows(has)
        seen = ext.visual(query, vision)  # (b, S, d)
        where = (has.nonzero().squeeze(1),)
        visual = visual.index_put(where, seen)
        proto = proto.index_put(where, nets.visual_sim_rows(seen, ext.prototype_visual(query)))
    return Keys(text, visual, proto, has)


def filtered(nets: LiveEditNets, items: Keys, edits: Keys) -> tuple[torch.Tensor, torch.Tensor]:
    """Which experts each item keeps (N, M) after the hard visual filter (text-only edits: the
    textual gate), and the textual similarities (N, M)."""
    text = nets.text_sim(items.text, edits.text)  # (N, M)
    closer = nets.visual_sim(items.visual, edits.visual) > items.prototype[:, None]  # (N, M)
    visual = items.has_image[:, None] & edits.has_image[None] & closer
    textual = ~edits.has_image[None] & (text > 0)
    return visual | textual, text


# --- the memory and its handle --------------------------------------------------------------


@dataclass(frozen=True)
class Expert:
    """One edit in memory: its keys (one row of ``Keys``) and its expert matrices C, R (rank, D)."""

    keys: Keys
    down: torch.Tensor
    up: torch.Tensor

    @property
    def floats(self) -> int:
        k = self.keys
        return sum(t.numel() for t in (k.text, k.visual, k.prototype, self.down, self.up))


class ExpertLayer(nn.Module):
    """Wraps a decoder layer: its output, plus ``active(output)`` while a mixture is set (else
    the layer's own output object, untouched). Holds the memory of live experts (plain tensors)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.active: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.experts: list[Expert] = []
        self.edits: list[LiveEdited] = []  # live handles, oldest first

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # models read their layers' attributes (attention_type, ...)
            return getattr(super().__getattr__("layer"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.layer(*args, **kwargs)
        if self.active is None:
            return out
        if isinstance(out, tuple):
            return (out[0] + self.active(out[0]), *out[1:])
        return out + self.active(out)


def _inner(model: LVLM, site: str) -> nn.Module:
    module = model.layout.module(site)
    return module.layer if isinstance(module, ExpertLayer) else module


@contextmanager
def mixing(model: LVLM, site: str, active: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """While active, layer ``site`` adds ``active(output)`` to its output (wrapping it if needed)."""
    module = model.layout.module(site)
    fresh = not isinstance(module, ExpertLayer)
    adaptor = ExpertLayer(module) if fresh else cast(ExpertLayer, module)
    if fresh:
        swap_module(model.model, site, adaptor)
    adaptor.active = active
    try:
        yield
    finally:
        adaptor.active = None
        if fresh:
            swap_module(model.model, site, module)


class LiveEdited(RoutedEdited):
    """Live LiveEdit experts: items are routed over the whole memory at the site (every live edit);
    restore removes this handle's experts (newest first), the last one puts the layer back."""

    def __init__(
        self, model: LVLM, editor: LiveEdit, site: str, adaptor: ExpertLayer, added: list[Expert]
    ) -> None:
        super().__init__(model, {"experts": len(adaptor.experts) + len(added)})
        self.editor, self.site, self.adaptor, self.added = editor, site, adaptor, added
        self.before = len(adaptor.experts)
        adaptor.experts = [*adaptor.experts, *added]
        adaptor.edits.append(self)

    @property
    def edited_params(self) -> int:
        """Floats this edit added to the memory (its keys and expert matrices)."""
        return sum(e.floats for e in self.added)

    def routes(self, items: Sequence[Item]) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per item the kept experts' indices (k,) and mixing weights (k,), or None for the unedited model."""
        self._check_live()
        return self.editor.route(self.model, self.adaptor, items)

    def _split(self, items: Sequence[Item], run: Callable[[list[Item]], Sequence[Any]]) -> list[Any]:
        """``run`` on the unrouted items together, then on each routed item with its own mixture."""
        routes = self.routes(items)
        out: list[Any] = [None] * len(items)
        base = [i for i, r in enumerate(routes) if r is None]
        if base:
            for i, res in zip(base, run([items[i] for i in base]), strict=True):
                out[i] = res
        nets = self.editor.nets(self.model)
        for i, route in enumerate(routes):
            if route is None:
                continue
            which, weights = route
            down = torch.stack([self.adaptor.experts[int(m)].down for m in which])  # (k, r, D)
            up = torch.stack([self.adaptor.experts[int(m)].up for m in which])  # (k, r, D)

            def add(
                h: torch.Tensor, down: torch.Tensor = down, up: torch.Tensor = up, w: torch.Tensor = weights
            ) -> torch.Tensor:
                return expert_residual(h, nets.norm, down, up, w.expand(h.shape[0], -1))

            with mixing(self.model, self.site, add):
                (out[i],) = run([items[i]])
        return out

    def _release(self) -> None:
        if self.adaptor.edits[-1] is not self:
            raise RuntimeError(f"liveedit: restore the later edits at {self.site} first (reverse order)")
        self.adaptor.edits.pop()
        self.adaptor.experts = self.adaptor.experts[: self.before]
        if not self.adaptor.edits:
            swap_module(self.model.model, self.site, self.adaptor.layer)


# --- the editor ---------------------------------------------------------------------------


@register_method("liveedit")
class LiveEdit(TrainableEditor[LiveEditConfig]):
    """LiveEdit: per edit a generated low-rank expert on one layer; visual filter, textual mixing."""

    name = "liveedit"
    defaults = LiveEditConfig()
    batches = True

    def build(self, model: LVLM) -> LiveEditNets:
        width = int(model.model.get_input_embeddings().weight.shape[1])
        if width % self.config.heads:
            raise ConfigError(
                f"liveedit heads ({self.config.heads}) must divide the model's hidden size {width}"
            )
        return LiveEditNets(width, self.config).to(model.device)

    def nets(self, model: LVLM) -> LiveEditNets:
        return cast(LiveEditNets, self.networks(model))

    def site(self, model: LVLM) -> str:
        return model.layout.layer(self.config.layer)

    # --- editing ------------------------------------------------------------------------------

    def apply(self, model: LVLM, case: EditCase) -> LiveEdited:
        return self.apply_many(model, [case])

    def apply_many(self, model: LVLM, cases: Sequence[EditCase]) -> LiveEdited:
        """Generate one expert per case (one batch of forwards) and add them all under one handle."""
        nets, site = self.nets(model), self.site(model)
        with torch.no_grad():
            experts = []
            for batch, rows in _grouped(model, [c.edit for c in cases]):
                parts = split_parts(model, batch, read_layer(model, site, batch)[0])
                keys = keys_of(nets, parts)
                down, up = nets.down(parts.content), nets.up(parts.content)  # (b, r, D) each
                idx = torch.arange(len(rows), device=down.device)
                experts += [
                    (r, Expert(keys.rows(i[None]), down[i], up[i])) for r, i in zip(rows, idx, strict=True)
                ]
        added = [e for _, e in sorted(experts, key=lambda x: x[0])]
        if not all(bool(torch.isfinite(t).all()) for e in added for t in (e.down, e.up, e.keys.text)):
            raise EditCollapsed("liveedit: a generated expert is non-finite", 0)
        module = model.layout.module(site)
        adaptor = module if isinstance(module, ExpertLayer) else ExpertLayer(module)
        if adaptor is not module:
            swap_module(model.model, site, adaptor)
        return LiveEdited(model, self, site, adaptor, added)

    def route(
        self, model: LVLM, adaptor: ExpertLayer, items: Sequence[Item]
    ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per item the experts it keeps and their weights (``filtered`` then ``mixing_weights``)."""
        if not adaptor.experts or not items:
            return [None] * len(items)
        nets, site = self.nets(model), self.site(model)
        memory = Keys.cat([e.keys for e in adaptor.experts])
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(items)
        with torch.no_grad():
            for batch, rows in _grouped(model, items):
                keys = keys_of(nets, split_parts(model, batch, read_layer(model, site, batch)[0]))
                keep, sim = filtered(nets, keys, memory)  # (b, M) each
                weights = mixing_weights(sim, keep)  # (b, M)
                for r, k, w in zip(rows, keep, weights, strict=True):
                    which = k.nonzero().squeeze(1)
                    out[r] = (which, w[which][None]) if which.numel() else None
        return out

    # --- training -----------------------------------------------------------------------------

    def meta_loss(
        self, model: LVLM, nets: nn.Module, cases: Sequence[EditCase]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        nets = cast(LiveEditNets, nets)
        rng = random.Random("|".join(c.case_id for c in cases))
        rows = _training_rows(cases, rng)
        site = self.site(model)
        groups = []
        for batch, index in _grouped(model, [item for item, _, _ in rows]):
            hidden, pre = read_layer(model, site, batch, logits=True)
            groups.append((batch, index, split_parts(model, batch, hidden), pre))
        device = model.device
        order = torch.tensor([i for _, index, _, _ in groups for i in index], device=device)
        keys = Keys.cat([keys_of(nets, parts) for _, _, parts, _ in groups]).rows(torch.argsort(order))
        owner = torch.tensor([c for _, c, _ in rows], device=device)  # (N,)
        role = [r for _, _, r in rows]
        pairs = _pairs(rows, cases, device)  # (N, B): +1 own in scope, -1 must not take, 0 unused
        contents: list[Any] = [None] * len(cases)
        for _, index, parts, _ in groups:  # the experts, from the edit rows
            for j, i in enumerate(index):
                if role[i] == EDIT:
                    contents[rows[i][1]] = (parts.content.x[j], parts.content.mask[j])
        content = Reps(*_stack_padded(contents))
        down, up = nets.down(content), nets.up(content)  # (B, r, D) each
        edits = keys.rows(torch.arange(len(cases), device=device))  # the edit rows come first
        text = nets.text_sim(keys.text, edits.text)  # (N, B)
        keep = self._training_mixtures(rows, len(cases), rng, device)  # (N, B)
        weights = mixing_weights(text, keep)  # (N, B)
        nll, kl = self._edited_losses(model, nets, site, groups, weights, down, up, role)
        soft = _soft_routing_loss(text, pairs, owner)
        local = torch.tensor([r == LOCAL for r in role], device=device)
        hard, filter_acc = _hard_routing_loss(nets, keys, edits, pairs, owner, local)
        cfg = self.config
        rel, gen = nll[0], nll[1]
        loss = cfg.rel_lambda * rel + cfg.gen_lambda * gen + cfg.loc_lambda * kl
        loss = loss + cfg.soft_lambda * soft + cfg.hard_lambda * hard
        stats = {
            k: float(v.detach())
            for k, v in (("rel_nll", rel), ("gen_nll", gen), ("loc_kl", kl), ("soft", soft))
        }
        return loss, stats | {"hard": float(hard.detach()), "filter_acc": filter_acc}

    def _training_mixtures(
        self, rows: list[tuple[Item, int, str]], n: int, rng: random.Random, device: torch.device
    ) -> torch.Tensor:
        """Which experts each row is scored with (N, B): its own (locality rows: at random) and each
        other edit's with probability ``share`` (the reference's random expert masks)."""
        keep = torch.zeros(len(rows), n, dtype=torch.bool)
        for i, (_, c, role) in enumerate(rows):
            for m in range(n):
                keep[i, m] = (m == c and role != LOCAL) or rng.random() < self.config.share
        return keep.to(device)

    def _edited_losses(
        self,
        model: LVLM,
        nets: LiveEditNets,
        site: str,
        groups: list[tuple[Batch, list[int], Parts, torch.Tensor | None]],
        weights: torch.Tensor,
        down: torch.Tensor,
        up: torch.Tensor,
        role: list[str],
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Mean NLL of the edit rows and of the generality rows, and the mean KL (unedited ‖ edited)
        per answer token of the locality rows, each row scored with its mixture."""
        zero = torch.zeros((), device=weights.device)
        per_role: dict[str, list[torch.Tensor]] = {EDIT: [], GENERAL: [], LOCAL: []}
        for batch, index, _, pre in groups:
            w = weights[torch.tensor(index, device=weights.device)]  # (b, B)

            def add(h: torch.Tensor, w: torch.Tensor = w) -> torch.Tensor:
                return expert_residual(h, nets.norm, down, up, w)

            with mixing(model, site, add):
                logits = model.logits(batch).float()  # (N, V)
            assert pre is not None
            rows, _ = batch.answer_positions  # (N,)
            nll = F.cross_entropy(logits, batch.answer_labels, reduction="none")  # (N,)
            p = F.log_softmax(pre.float(), -1)
            kl = (p.exp() * (p - F.log_softmax(logits, -1))).sum(-1)  # (N,)
            for j, i in enumerate(index):
                tokens = rows == j
                per_role[role[i]].append(kl[tokens] if role[i] == LOCAL else nll[tokens].mean()[None])
        means = {k: torch.cat(v).mean() if v else zero for k, v in per_role.items()}
        return (means[EDIT], means[GENERAL]), means[LOCAL]


# --- training rows and losses ---------------------------------------------------------------


def _training_rows(cases: Sequence[EditCase], rng: random.Random) -> list[tuple[Item, int, str]]:
    """Per case: its edit, one probe of each generality kind, one routable probe of each locality kind."""
    rows: list[tuple[Item, int, str]] = [(case.edit, c, EDIT) for c, case in enumerate(cases)]
    for c, case in enumerate(cases):
        for kind in GENERALITY_KINDS:
            if probes := case.probes_of(kind):
                rows.append((rng.choice(probes), c, GENERAL))
        for kind in LOCALITY_KINDS:
            routable = [p for p in case.probes_of(kind) if case.edit.image is None or p.image is not None]
            if routable:
                rows.append((rng.choice(routable), c, LOCAL))
    return rows


def _pairs(
    rows: list[tuple[Item, int, str]], cases: Sequence[EditCase], device: torch.device
) -> torch.Tensor:
    """(N, B): +1 where row n asks edit b's fact (its own case, not a locality row), -1 where it must
    not take edit b (another case's edit, unless it is the same question on the same image; its own
    edit for a locality row), 0 for the row that is edit b itself (trivially its own)."""
    out = torch.zeros(len(rows), len(cases))
    for n, (item, c, role) in enumerate(rows):
        for b, case in enumerate(cases):
            same = (item.prompt, item.image) == (case.edit.prompt, case.edit.image)
            if b == c:
                out[n, b] = -1.0 if role == LOCAL else (0.0 if role == EDIT else 1.0)
            elif not same:
                out[n, b] = -1.0
    return out.to(device)


def _soft_routing_loss(text: torch.Tensor, pairs: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """Softmax over the batch's edits picks the own one (in-scope rows), and the sigmoid is positive
    for the own edit and negative for the rest (each group averaged, then the two added)."""
    pos, neg = pairs > 0, pairs < 0
    if not bool(pos.any()):
        return text.sum() * 0.0
    scoped = pos.any(dim=1)  # (N,)
    relative = F.cross_entropy(text[scoped], owner[scoped])
    return relative + _balanced_logistic(text, pos, neg)


def _hard_routing_loss(
    nets: LiveEditNets, keys: Keys, edits: Keys, pairs: torch.Tensor, owner: torch.Tensor, local: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Over rows and edits that both have an image: softmax over [the edits' visual similarities,
    the prototype's] picks the own edit for in-scope rows and the prototype for locality rows
    (the reference's neighbour and prototype losses), plus a logistic loss on the filter's decision
    (similarity minus the prototype's); and the filter's accuracy on those pairs."""
    both = keys.has_image[:, None] & edits.has_image[None]  # (N, B)
    pos, neg = (pairs > 0) & both, (pairs < 0) & both
    if not bool((pos | neg).any()):
        return keys.text.sum() * 0.0, float("nan")
    sim = nets.visual_sim(keys.visual, edits.visual)  # (N, B)
    margin = sim - keys.prototype[:, None]  # (N, B)
    with_proto = torch.cat([sim.masked_fill(~both, -1e4), keys.prototype[:, None]], dim=1)  # (N, B + 1)
    scoped = pos.any(dim=1)  # (N,)
    local = local & both.any(dim=1)
    terms = [_balanced_logistic(margin, pos, neg)]
    if bool(scoped.any()):
        terms.append(F.cross_entropy(with_proto[scoped], owner[scoped]))
    if bool(local.any()):
        target = torch.full((int(local.sum()),), with_proto.shape[1] - 1, device=owner.device)
        terms.append(F.cross_entropy(with_proto[local], target))
    decided = ((margin > 0) == pos)[pos | neg]
    return torch.stack(terms).sum(), float(decided.float().mean())


def _balanced_logistic(logits: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Logistic loss, positives and negatives averaged apart and added (negatives far outnumber them)."""
    each = F.binary_cross_entropy_with_logits(logits, pos.float(), reduction="none")
    parts = [each[m].mean() for m in (pos, neg) if bool(m.any())]
    return torch.stack(parts).sum()


def _grouped(model: LVLM, items: Sequence[Item]) -> Iterator[tuple[Batch, list[int]]]:
    """Items encoded as at most two batches (with and without an image), with their indices."""
    for want in (False, True):
        index = [i for i, it in enumerate(items) if (it.image is not None) == want]
        if index:
            yield model.encode([items[i] for i in index]), index


def _stack_padded(rows: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (L_i, D), mask (L_i,)) per row, padded to one length: (B, L, D), (B, L)."""
    width = max(int(x.shape[0]) for x, _ in rows)
    xs = [F.pad(x, (0, 0, 0, width - x.shape[0])) for x, _ in rows]
    masks = [F.pad(m, (0, width - m.shape[0])) for _, m in rows]
    return torch.stack(xs), torch.stack(masks)
