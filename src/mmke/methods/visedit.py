"""VisEdit: a Visual Edit ADapter (VEAD) rewrites the visual tokens' hidden states at one mid-to-late
decoder layer, gated per token by an influence mapper (Chen et al. 2025, "Attribution Analysis Meets
Model Editing: Advancing Knowledge Correction in Vision Language Models with VisEdit", AAAI 2025;
code qizhou000/VisEdit, ``editor/vllm_editors/vead``).

The paper's attribution finding: the visual tokens that matter for a prediction are those relevant
to the prompt, read by the mid-to-late layers. VEAD therefore sits on the output of decoder layer
``layer`` (default: the reference's relative depth, layer 18 of LLaVA-1.5's 32) and, for every
visual token ``h`` of an input, adds ``σ(m(h, c)) · W_out · CrossAttn(W_in · LN(h), LN(E))``, where
``E`` (L, D) is that layer's output over the edit's own prompt, image and target tokens (the
"edit signal", read once per edit from the unedited model) and ``c`` its value at the edit's last
prompt token. ``m`` is the influence mapper: residual MLPs of the token and of ``c``, multi-head dot
product averaged over heads. Text tokens and items without an image are never touched, so a
text-only item scores bit-identically to the unedited model.

Meta-training (``meta_loss``), as ``vead.py`` ``train_a_batch``: per case the NLL of the edit
(``rel_lambda``) and of its generality probes (``gen_lambda``) with the adapter on, the KL from
the unedited model on its locality probes (``loc_lambda``; those the adapter can touch: with an
image), each row paired with its own case's signal; plus ``mapper_lambda`` x the influence
mapper's three terms on ``samples`` visual tokens of the edit or one generality probe (picked at
random): cross-entropy of its softmax against the tokens' measured influence, -log σ on those
tokens and -log(1 - σ) on the locality probe's visual tokens. A token's influence is measured as
the reference does it: Gaussian noise on that token's input to the self-attention of the layers
after the edit layer (the reference's 19-30 of 32; here every later layer but the last, else the
last, else the edit layer itself), 1 - cos of the attention output at the last prompt token.

Differences from the reference, and why:
- Stacked edits (lifelong; the reference keeps one edit at a time) each add their own gated term:
  a token gets ``Σ_j σ(m(h, c_j)) · f(h, E_j)``, so one edit behaves exactly as in the paper and
  each handle removes only its own term (in any order). ``apply_many`` writes several edits in
  one update the same way (the reference's batch pairs request i with input row i instead).
- The noise of the influence measurement is scaled by the RMS of the row's visual-token states
  (the reference adds std 0.7 in absolute units, tuned to LLaVA-7B's scale); the attribution uses
  the rel/generality probe's own prompt and image (the reference splices its image states into
  the edit's prompt); the locality "down" term uses all visual tokens of the probe.
- ``W_out`` starts at zero, so the untrained editor is the unedited model (the reference starts
  from PyTorch's default init).
- Text-only models have no visual tokens: there every token is a token the adapter edits (the
  gate decides which matter), and the text locality probes join the KL and "down" terms. This is
  the paper's mechanism on the only representations such a model has; it is not in the paper.

Where the visual tokens are: the family's image token id in ``input_ids`` (as ``LVLM`` finds
image slots), read by a pre-hook on the model's forward; decode steps of generation carry no
image token, so, as in the reference, they are left alone.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from mmke.errors import ConfigError
from mmke.methods._hyper import locality_kl
from mmke.methods.base import EditCollapsed, Edited
from mmke.methods.trainable import TrainableEditor, TrainingConfig
from mmke.models.base import LVLM, Item
from mmke.models.batch import Batch
from mmke.registry import register_method
from mmke.types import LOCALITY_KINDS, EditCase, ProbeKind

GENERALITY_KINDS = frozenset({ProbeKind.TEXT_GENERALITY, ProbeKind.IMAGE_GENERALITY})


@dataclass(frozen=True)
class VisEditConfig(TrainingConfig):
    """VisEdit settings on top of the shared training fields (reference values for LLaVA-1.5-7B).

    ``layer``: the decoder layer whose output VEAD edits (None: 9/16 of the depth, the reference's
    18 of 32, and at most the last but one: a later layer must read the edited tokens). The
    adapter's width ``mid_dim`` with ``heads`` cross-attention heads (also the mapper's heads over
    the hidden size); the mapper's residual MLPs ``mapper_dim`` wide;
    ``influence`` False drops the mapper's gate (the reference's ``add_it``). Loss weights
    ``rel_lambda`` / ``gen_lambda`` / ``loc_lambda`` / ``mapper_lambda``; ``samples`` visual
    tokens per case are perturbed with noise ``noise`` (in units of their RMS) to measure influence.
    """

    layer: int | None = None
    mid_dim: int = 1024
    heads: int = 8
    mapper_dim: int = 1024
    influence: bool = True
    rel_lambda: float = 1.0
    gen_lambda: float = 1.0
    loc_lambda: float = 1.0
    mapper_lambda: float = 0.1
    samples: int = 24
    noise: float = 0.7
    train_steps: int = 1000
    train_batch: int = 4
    train_lr: float = 1e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.mid_dim, self.heads, self.mapper_dim, self.samples) < 1:
            raise ConfigError("visedit mid_dim, heads, mapper_dim and samples must be >= 1")
        if self.mid_dim % self.heads:
            raise ConfigError(f"visedit heads ({self.heads}) must divide mid_dim ({self.mid_dim})")
        weights = (self.rel_lambda, self.gen_lambda, self.loc_lambda, self.mapper_lambda)
        if min(weights) < 0 or self.rel_lambda + self.gen_lambda == 0:
            raise ConfigError("visedit loss weights must be >= 0, and rel_lambda + gen_lambda > 0")
        if not self.noise > 0:
            raise ConfigError(f"visedit noise must be > 0, got {self.noise}")


# --- networks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditSignal:
    """One edit as VEAD reads it: the edit layer's output over the edit's tokens (L, D) and at its
    last prompt token (D,), from the unedited model."""

    reps: torch.Tensor  # (L, D)
    cue: torch.Tensor  # (D,)

    @property
    def floats(self) -> int:
        return self.reps.numel() + self.cue.numel()


class ResidualMap(nn.Module):
    """x + W2 relu(W1 x)."""

    def __init__(self, dim: int, mid: int) -> None:
        super().__init__()
        self.l_in, self.l_out = nn.Linear(dim, mid), nn.Linear(mid, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.l_out(torch.relu(self.l_in(x)))


class InfluenceMapper(nn.Module):
    """Per token, a logit of its relevance to an edit: head-wise dot product of mapped token and cue."""

    def __init__(self, dim: int, mid: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_tokens, self.ln_cue = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.tokens, self.cue = ResidualMap(dim, mid), ResidualMap(dim, mid)

    def forward(self, tokens: torch.Tensor, cue: torch.Tensor) -> torch.Tensor:
        """Logits (N,) of tokens (N, D) against a cue (D,) or one cue per token (N, D)."""
        n, d = tokens.shape
        t = self.tokens(self.ln_tokens(tokens)).reshape(n, self.heads, d // self.heads)  # (N, H, D/H)
        c = self.cue(self.ln_cue(cue)).reshape(-1, self.heads, d // self.heads)  # (N or 1, H, D/H)
        return (t * c).sum(-1).mean(-1) / (d // self.heads) ** 0.5  # (N,)


class VisualEditAdapter(nn.Module):
    """VEAD: the gated update of tokens (N, D) that reads an edit's signal by cross-attention."""

    def __init__(self, dim: int, mid: int, heads: int, mapper_dim: int, influence: bool) -> None:
        super().__init__()
        self.heads, self.mid, self.influence = heads, mid, influence
        self.ln_tokens, self.ln_edit = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp_begin = nn.Linear(dim, mid)
        self.q, self.k, self.v = nn.Linear(mid, mid), nn.Linear(dim, mid), nn.Linear(dim, mid)
        self.mlp_end = nn.Linear(mid, dim)
        nn.init.zeros_(self.mlp_end.weight)  # the untrained editor leaves the model as it is
        nn.init.zeros_(self.mlp_end.bias)
        self.mapper = InfluenceMapper(dim, mapper_dim, heads)

    def gate(self, tokens: torch.Tensor, signal: EditSignal) -> torch.Tensor:
        """σ of the influence logits (N, 1); 1 without the mapper."""
        if not self.influence:
            return torch.ones_like(tokens[:, :1])
        return torch.sigmoid(self.mapper(tokens, signal.cue))[:, None]  # (N, 1)

    def forward(self, tokens: torch.Tensor, signal: EditSignal) -> torch.Tensor:
        """The update (N, D) of tokens (N, D) for one edit."""
        n, length, h, m = tokens.shape[0], signal.reps.shape[0], self.heads, self.mid // self.heads
        q = self.q(self.mlp_begin(self.ln_tokens(tokens))).reshape(n, h, m)  # (N, H, m)
        edit = self.ln_edit(signal.reps)  # (L, D)
        k, v = self.k(edit).reshape(length, h, m), self.v(edit).reshape(length, h, m)  # (L, H, m)
        att = torch.softmax(torch.einsum("nhm,lhm->hnl", q, k) / m**0.5, dim=-1)  # (H, N, L)
        x = torch.einsum("hnl,lhm->nhm", att, v).reshape(n, self.mid)  # (N, mid)
        return self.mlp_end(x) * self.gate(tokens, signal)  # (N, D)


# --- where the adapter acts -------------------------------------------------------------------


class AdapterSite:
    """VEAD's hooks on one model: a pre-hook on its forward reads which tokens are visual, a hook on
    the edit layer adds the live edits' updates there. ``rows`` (B,), when set, pairs each batch row
    with one signal (meta-training) instead of every signal applying to every row; ``record`` keeps
    the layer's own output (before any update) in ``recorded``."""

    def __init__(self, model: LVLM, layer: str, adapter: VisualEditAdapter) -> None:
        self.adapter, self.layer = adapter, layer
        self.image_id = model.image_token_id
        self.signals: list[EditSignal] = []
        self.rows: torch.Tensor | None = None
        self.record = False
        self.recorded: torch.Tensor | None = None
        self.edits: list[VisEditEdited] = []  # live handles
        self._mask: torch.Tensor | None = None
        root = model.model
        self._handles = [
            root.register_forward_pre_hook(self._see_ids, with_kwargs=True),
            root.register_forward_hook(self._forget_ids, always_call=True),
            model.layout.module(layer).register_forward_hook(self._adapt),
        ]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def mask(self, ids: torch.Tensor) -> torch.Tensor:
        """Which tokens of ``ids`` (B, T) the adapter edits (B, T)."""
        if self.image_id is None:
            return torch.ones_like(ids, dtype=torch.bool)
        return ids == self.image_id

    def _see_ids(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._mask = None if ids is None else self.mask(ids)

    def _forget_ids(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        self._mask = None

    def _adapt(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        hidden = out[0] if isinstance(out, tuple) else out  # (B, T, D)
        if self.record:
            self.recorded = hidden.detach()
        if not self.signals:
            return None
        mask = self._mask
        if mask is None or mask.shape != hidden.shape[:2]:
            got = None if mask is None else tuple(mask.shape)
            raise RuntimeError(f"visedit: {self.layer} ran without input ids that line up ({got})")
        rows, cols = mask.nonzero(as_tuple=True)  # (N,), (N,)
        if not rows.numel():
            return None
        x = hidden[rows, cols].float()  # (N, D)
        update = torch.zeros_like(x)
        for j, signal in enumerate(self.signals):
            if self.rows is None:
                update = update + self.adapter(x, signal)
                continue
            pick = (self.rows[rows] == j).nonzero().squeeze(1)  # (n,)
            if pick.numel():
                update = update.index_add(0, pick, self.adapter(x[pick], signal))
        new = hidden.index_put((rows, cols), (x + update).to(hidden.dtype))  # (B, T, D)
        return (new, *out[1:]) if isinstance(out, tuple) else new


@contextmanager
def adapter_site(model: LVLM, layer: str, adapter: VisualEditAdapter) -> Iterator[AdapterSite]:
    """A site for the duration of the block (meta-training and reading signals)."""
    site = AdapterSite(model, layer, adapter)
    try:
        yield site
    finally:
        site.close()


@contextmanager
def attention_calls(model: LVLM, names: Sequence[str]) -> Iterator[list[tuple[nn.Module, Any, Any, Any]]]:
    """Each call of the named modules while active: (module, args, kwargs, output)."""
    calls: list[tuple[nn.Module, Any, Any, Any]] = []

    def keep(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        calls.append((module, args, kwargs, out))

    handles = [model.layout.module(n).register_forward_hook(keep, with_kwargs=True) for n in names]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def prompt_ends(batch: Batch) -> torch.Tensor:
    """Each row's last prompt token (B,): the one whose logit predicts the first answer token."""
    return batch.answer_mask.int().argmax(dim=1) - 1


def signals_of(reps: torch.Tensor, batch: Batch, rows: Sequence[int]) -> list[EditSignal]:
    """Signals of ``rows`` of a batch from the edit layer's output ``reps`` (B, T, D), pads dropped."""
    ends, keep = prompt_ends(batch), batch.inputs["attention_mask"].bool()  # (B,), (B, T)
    return [EditSignal(reps[r][keep[r]].float(), reps[r, int(ends[r])].float()) for r in rows]


# --- the edit handle ------------------------------------------------------------------------


class VisEditEdited(Edited):
    """Live VisEdit edits: their signals sit in the site; restore takes out exactly those (any order);
    the last live handle removes the hooks."""

    def __init__(self, model: LVLM, editor: VisEdit, site: AdapterSite, signals: list[EditSignal]) -> None:
        super().__init__(model, {"edits": len(signals), "live_signals": len(site.signals) + len(signals)})
        self.editor, self.site, self.signals = editor, site, signals
        site.signals.extend(signals)
        site.edits.append(self)

    @property
    def edited_params(self) -> int:
        """Floats the edit added: its signals (the adapter is the editor's, not the edit's)."""
        return sum(s.floats for s in self.signals)

    def _release(self) -> None:
        mine = {id(s) for s in self.signals}
        self.site.signals = [s for s in self.site.signals if id(s) not in mine]
        self.site.edits = [e for e in self.site.edits if e is not self]
        if not self.site.edits:
            self.editor.drop_site(self.model, self.site)


# --- the editor -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainRows:
    """One meta-training batch's items: per case its edit, generality and locality rows."""

    items: list[Item]
    case_of: list[int]  # row -> case index
    edits: list[int]  # case -> its edit's row
    gens: list[int]
    locs: list[int]
    picks: list[int | None]  # case -> row whose visual tokens train the mapper's influence terms


@register_method("visedit")
class VisEdit(TrainableEditor[VisEditConfig]):
    """VisEdit: a trained visual edit adapter at one decoder layer, gated by an influence mapper."""

    name = "visedit"
    defaults = VisEditConfig()
    batches = True

    def __init__(self, config: VisEditConfig | Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self._sites: dict[int, AdapterSite] = {}  # id(model) -> the site of its live edits

    # --- sites ----------------------------------------------------------------------------

    def edit_layer(self, model: LVLM) -> int:
        """The edited layer's index: a later layer must read the visual tokens, so never the last."""
        n = model.layout.n_layers
        layer = self.config.layer if self.config.layer is not None else min(n * 9 // 16, n - 2)
        model.layout.layer(layer)  # LayoutError for a layer the model does not have
        if layer % n == n - 1:
            raise ConfigError(
                f"visedit layer {layer} is the model's last decoder layer (of {n}): no later layer "
                "reads the edited visual tokens; pick an earlier one"
            )
        return layer % n

    def trace_layers(self, model: LVLM) -> list[str]:
        """Attention blocks whose inputs measure influence: after the edit layer, before the last."""
        n, e = model.layout.n_layers, self.edit_layer(model)
        picked = list(range(e + 1, n - 1)) or list(range(e + 1, n)) or [e]
        return [model.layout.attention(i) for i in picked]

    def drop_site(self, model: LVLM, site: AdapterSite) -> None:
        site.close()
        if self._sites.get(id(model)) is site:
            del self._sites[id(model)]

    def _site(self, model: LVLM) -> AdapterSite:
        site = self._sites.get(id(model))
        if site is None:
            adapter = cast(VisualEditAdapter, self.networks(model))
            site = AdapterSite(model, model.layout.layer(self.edit_layer(model)), adapter)
            self._sites[id(model)] = site
        return site

    # --- training hooks ---------------------------------------------------------------------

    def build(self, model: LVLM) -> VisualEditAdapter:
        cfg = self.config
        dim = int(model.model.get_input_embeddings().weight.shape[1])
        if dim % cfg.heads:
            raise ConfigError(f"visedit heads ({cfg.heads}) must divide the model's hidden size ({dim})")
        self.edit_layer(model)
        adapter = VisualEditAdapter(dim, cfg.mid_dim, cfg.heads, cfg.mapper_dim, cfg.influence)
        return adapter.to(model.device)

    def meta_loss(
        self, model: LVLM, nets: nn.Module, cases: Sequence[EditCase]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        adapter, cfg = cast(VisualEditAdapter, nets), self.config
        rng = random.Random(f"{cfg.train_seed}|" + "|".join(c.case_id for c in cases))
        plan = self._rows(model, cases, rng)
        batch = model.encode(plan.items)
        layer = model.layout.layer(self.edit_layer(model))
        with adapter_site(model, layer, adapter) as site:
            site.record = True
            with torch.no_grad(), attention_calls(model, self.trace_layers(model)) as calls:
                pre = model.logits(batch)  # (N, V): the unedited model
            reps, site.record = site.recorded, False
            assert reps is not None
            site.signals = signals_of(reps, batch, plan.edits)
            site.rows = torch.tensor(plan.case_of, device=reps.device)
            post = model.logits(batch)  # (N, V): each row edited by its own case
            mask = site.mask(batch.inputs["input_ids"])  # (B, T)
        nll = _row_nll(post, batch)  # (B,)
        rel, gen = nll[plan.edits].mean(), _mean(nll, plan.gens)
        loc = self._locality(pre, post, batch, plan.locs)
        loss = cfg.rel_lambda * rel + cfg.gen_lambda * gen + cfg.loc_lambda * loc
        stats = {
            "rel_nll": float(rel.detach()),
            "gen_nll": float(gen.detach()),
            "loc_kl": float(loc.detach()),
        }
        if cfg.influence and cfg.mapper_lambda > 0:
            gen_torch = torch.Generator().manual_seed(rng.getrandbits(62))
            terms = self._mapper_terms(adapter, batch, plan, reps, mask, site.signals, calls, gen_torch)
            loss = loss + cfg.mapper_lambda * sum(terms.values(), torch.zeros((), device=loss.device))
            stats |= {k: float(v.detach()) for k, v in terms.items()}
        return loss, stats

    def _touches(self, model: LVLM, item: Item) -> bool:
        """Whether the adapter can change the item: it has visual tokens (text-only models: always)."""
        return model.image_token_id is None or item.image is not None

    def _rows(self, model: LVLM, cases: Sequence[EditCase], rng: random.Random) -> TrainRows:
        items: list[Item] = []
        case_of: list[int] = []
        edits, gens, locs, picks = [], [], [], []

        def add(item: Item, c: int) -> int:
            items.append(item)
            case_of.append(c)
            return len(items) - 1

        for c, case in enumerate(cases):
            edits.append(add(case.edit, c))
            own = [edits[-1]] if self._touches(model, case.edit) else []
            for p in case.probes:
                if p.kind in GENERALITY_KINDS and self._touches(model, p):
                    gens.append(add(p, c))
                    own.append(gens[-1])
                elif p.kind in LOCALITY_KINDS and self._touches(model, p):
                    locs.append(add(p, c))
            picks.append(rng.choice(own) if own else None)
        return TrainRows(items, case_of, edits, gens, locs, picks)

    def _locality(self, pre: torch.Tensor, post: torch.Tensor, batch: Batch, rows: list[int]) -> torch.Tensor:
        if not rows:
            return post.sum() * 0.0
        token_rows, _ = batch.answer_positions  # (N,)
        keep = torch.isin(token_rows, torch.tensor(rows, device=token_rows.device))  # (N,)
        return locality_kl([pre[keep]], [post[keep]])

    def _mapper_terms(
        self,
        adapter: VisualEditAdapter,
        batch: Batch,
        plan: TrainRows,
        reps: torch.Tensor,
        mask: torch.Tensor,
        signals: list[EditSignal],
        calls: list[tuple[nn.Module, Any, Any, Any]],
        gen: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        """The influence mapper's relative, "up" and "down" terms (reference ``train_a_batch``)."""
        zero = reps.new_zeros(())
        ends = prompt_ends(batch)  # (B,)
        picked = [(c, r) for c, r in enumerate(plan.picks) if r is not None]
        before_end = mask & (torch.arange(mask.shape[1], device=mask.device)[None] <= ends[:, None])  # (B, T)
        picked = [(c, r) for c, r in picked if bool(before_end[r].any())]
        terms = {"map_rel": zero, "map_up": zero, "map_down": zero}
        if picked:
            rows = torch.tensor([r for _, r in picked], device=reps.device)  # (R,)
            pos, valid = _sample_tokens(before_end[rows], self.config.samples, gen)  # (R, S), (R, S)
            target = _influence(calls, rows, ends[rows], pos, valid, self.config.noise, gen)  # (R, S)
            tokens = reps[rows[:, None], pos].float()  # (R, S, D)
            cues = torch.stack([signals[c].cue for c, _ in picked])  # (R, D)
            logits = adapter.mapper(tokens.flatten(0, 1), cues.repeat_interleave(pos.shape[1], 0))
            logits = logits.reshape(pos.shape)  # (R, S)
            log_p = torch.log_softmax(logits.masked_fill(~valid, -1e9), dim=1)  # (R, S)
            terms["map_rel"] = -(target * log_p).masked_fill(~valid, 0).sum(1).mean()
            terms["map_up"] = -F.logsigmoid(logits[valid]).mean()
        loc_rows = torch.tensor(plan.locs, dtype=torch.long, device=reps.device)
        loc_mask = torch.zeros_like(mask)
        loc_mask[loc_rows] = mask[loc_rows]
        r, t = loc_mask.nonzero(as_tuple=True)  # (n,), (n,)
        if r.numel():
            cue_of = torch.stack([s.cue for s in signals])  # (C, D)
            case = torch.tensor(plan.case_of, device=reps.device)[r]  # (n,)
            terms["map_down"] = -F.logsigmoid(-adapter.mapper(reps[r, t].float(), cue_of[case])).mean()
        return terms

    # --- editing ----------------------------------------------------------------------------

    def apply(self, model: LVLM, case: EditCase) -> VisEditEdited:
        return self.apply_many(model, [case])

    def apply_many(self, model: LVLM, cases: Sequence[EditCase]) -> VisEditEdited:
        """Read every edit's signal from the unedited layer in one forward and add them all at once."""
        site = self._site(model)
        try:
            batch = model.encode([c.edit for c in cases])
            site.record = True
            with torch.no_grad():
                model.logits(batch)
            reps = site.recorded
            assert reps is not None
            signals = signals_of(reps, batch, range(len(cases)))
            if not all(bool(torch.isfinite(s.reps).all()) for s in signals):
                raise EditCollapsed("visedit: the edit signal is not finite", 0)
        except BaseException:
            if not site.edits:
                self.drop_site(model, site)
            raise
        finally:
            site.record, site.recorded = False, None
        return VisEditEdited(model, self, site, signals)


def _row_nll(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Each row's mean target NLL (B,) from answer-span logits (N, V)."""
    nll = F.cross_entropy(logits.float(), batch.answer_labels, reduction="none")  # (N,)
    rows, _ = batch.answer_positions  # (N,)
    lengths = torch.tensor(batch.answer_lengths, dtype=nll.dtype, device=nll.device)  # (B,)
    return torch.zeros_like(lengths).index_add(0, rows, nll) / lengths  # (B,)


def _mean(values: torch.Tensor, rows: list[int]) -> torch.Tensor:
    return values[rows].mean() if rows else values.sum() * 0.0


def _sample_tokens(
    candidates: torch.Tensor, samples: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``samples`` random positions per row of ``candidates`` (R, T): positions and validity (R, S)."""
    picks = []
    for row in candidates.cpu():
        where = row.nonzero().squeeze(1)  # (n,)
        picks.append(where[torch.randperm(where.numel(), generator=gen)[:samples]])
    width = max(p.numel() for p in picks)
    pos = torch.zeros(len(picks), width, dtype=torch.long)  # (R, S)
    valid = torch.zeros(len(picks), width, dtype=torch.bool)  # (R, S)
    for i, p in enumerate(picks):
        pos[i, : p.numel()], valid[i, : p.numel()] = p, True
    return pos.to(candidates.device), valid.to(candidates.device)


@torch.no_grad()
def _influence(
    calls: list[tuple[nn.Module, Any, Any, Any]],
    rows: torch.Tensor,
    ends: torch.Tensor,
    pos: torch.Tensor,
    valid: torch.Tensor,
    noise: float,
    gen: torch.Generator,
) -> torch.Tensor:
    """Each sampled token's share of influence on its row's last prompt token (R, S), rows summing to 1.

    Per traced attention call: noise on one sampled token's input per row at a time, rerun the
    block, 1 - cos between the noisy and clean outputs at the last prompt token; mean over blocks.
    """
    total = torch.zeros(pos.shape, device=pos.device)  # (R, S)
    for module, args, kwargs, out in calls:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (B, T, D)
        clean = _first(out)[rows, ends]  # (R, D)
        cand = hidden[rows[:, None], pos].float() * valid[..., None]  # (R, S, D)
        count = valid.sum(1, keepdim=True).clamp_min(1) * hidden.shape[-1]  # (R, 1)
        scale = (cand.pow(2).sum(dim=(1, 2))[:, None] / count).sqrt()  # (R, 1): RMS of the sampled states
        for s in range(pos.shape[1]):
            on = valid[:, s]  # (R,)
            shake = torch.randn(int(on.sum()), hidden.shape[-1], generator=gen).to(hidden.device)
            noisy = hidden.clone()
            noisy[rows[on], pos[on, s]] += (shake * noise * scale[on]).to(hidden.dtype)
            dirty = _first(_call(module, args, kwargs, noisy))[rows, ends]  # (R, D)
            total[:, s] += 1 - F.cosine_similarity(dirty.float(), clean.float(), dim=-1)
    total = total.masked_fill(~valid, 0).clamp_min(0)
    return total / total.sum(1, keepdim=True).clamp_min(1e-12)  # (R, S)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _call(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor) -> Any:
    if "hidden_states" in kwargs:
        return module(*args, **{**kwargs, "hidden_states": hidden})
    return module(hidden, *args[1:], **kwargs)
