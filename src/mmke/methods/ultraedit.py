"""UltraEdit: a closed-form lifelong editor for MLP linears, from one hidden state and its gradient
(Gu et al. 2025, "UltraEdit: Training-, Subject-, and Memory-Free Lifelong Editing in Large Language
Models", arXiv 2505.14679; code XiaojieGu/UltraEdit, also EasyEdit's ULTRAEDIT).

Training-free (no network is meta-trained and nothing is optimised: the edit is linear algebra),
subject-free (keys are read at the answer positions, no subject token is located) and memory-free
(no codebook, side memory or retriever: the shift is written into the weights). One edit turn (one
case for ``apply``, all cases for ``apply_many``) does, for every edited linear ``W`` (D, I):

1. Features, from one forward and one backward pass of the edit loss on the model as it is: at
   every position that predicts an answer token, the layer's input ``k`` (I,) and the gradient
   ``g`` (D,) of the loss with respect to the layer's output; ``z = [k ; g]``.
2. Lifelong normalisation: running mean ``μ`` and standard deviation ``σ`` of ``z`` over every
   answer token of every edit so far at this layer, this turn's included (the paper's update:
   ``μ += n/(N+n) δ``, ``s² += n Var + N n/(N+n) δ²``, ``δ`` = turn mean − ``μ``); then
   ``ẑ = (z − μ) / (σ + ε)`` is split into ``k̂`` and ``ĝ``.
3. Value targets ``v = −lr ‖k̂‖² ĝ``: the output change at ``k̂`` of one gradient step of size lr
   on ``W`` (``ΔW = −lr ĝ k̂ᵀ`` moves ``W k̂`` by ``−lr ‖k̂‖² ĝ``), in normalised units.
4. The shift is the ridge solution for the raw keys ``K`` (n, I) and targets ``V`` (n, D):
   ``ΔWᵀ = (KᵀK + λ I)⁻¹ KᵀV`` (the paper's λ = 1), added to ``W``. Every layer's shift comes
   from the same pass and all are written together (unlike MEMIT, no layer sees another's edit).

Edited layers: the MLP output projections ``layout.mlp_out(l)``, ``l`` in ``layers`` (clipped and
deduplicated like MEMIT's). The repository's run command edits Mistral-7B's ``down_proj`` in layers
29 and 30 of 32, its GPT-J config ``fc_out`` in layers 18-26 of 28: late layers but not the last.
The default ``(-3, -2)`` is that run command's pair; on the 2-layer tiny models it clips to layer
0, on the 4-layer world model it edits layers 1 and 2. Its Llama/Qwen configs edit ``gate_proj``
and ``up_proj`` instead, which mmke's layout does not name as a role.

``lr`` is the paper's 1e-6, tuned for 7B widths. ``‖v‖ ≈ lr · I · √D`` (``‖k̂‖² ≈ I``, ``ĝ`` of unit
variance per coordinate), so narrow models need a larger one: 1e-2 on the tiny models (I = 128),
0.02 on the world model (I = 576; its ``mmke_methods.yaml``). There, on the first 12 eval cases,
single edits reach Rel 95.8 / T-Loc 95.8 / I-Loc 45.8 (token accuracy, %). A lifelong stream of
one-case turns wears it down: after 10 edits Rel 55 / T-Loc 95, and by 30 the runner reports a
behavioural collapse; a smaller ``lr`` or a larger ``ridge`` keeps more locality but lands fewer
edits (the paper's models are 7B, with 9-18 edited linears sharing each turn).

Where this differs from the paper, and why:

- Warm-up (``warmup``): the paper starts from empty statistics. Then a turn of one case with a
  one-token answer normalises to zero (its feature is its own mean: no edit; the code's unbiased
  variance even makes it NaN), and single editing (edit, score, restore) is always such a first
  turn. ``train`` folds the edit features of ``warmup`` train cases into the statistics (the same
  pass, no weight change), so the first edit is normalised against features of other edits;
  ``warmup=0`` is the paper's cold start.
- The variance term is the turn's population variance, so ``s²`` is exactly the sum of squared
  deviations and ``σ² = s² / (N − 1)`` the sample variance of every feature seen; the code's
  ``torch.var`` is the unbiased one (slightly larger, and NaN for a turn of one token).
- Statistics per edited layer. The code keys its normaliser by weight shape, so same-shaped layers
  share one statistic that each of them updates every turn (its MALMEN/RLEdit ancestry shares a
  hypernetwork per shape); layers at different depths have different activation scales.
- Loss: the sum over cases of each case's mean target NLL, so a case's gradients do not depend on
  how many cases share its pass (warm-up, single and batch turns feed one statistic). The paper's
  token mean over fixed-size sub-batches differs from it by a constant factor per run.
- The solve runs in float64, in the dual form ``Kᵀ (KKᵀ + λ I)⁻¹ V`` when a turn has fewer
  tokens than the layer has inputs (the same solution, a smaller system).

Lifelong editing: the statistics live on the editor, per model (weakly keyed, never global). Each
handle snapshots the weights it shifts and the statistics before its turn; restore (newest first)
puts both back, so after every restore the model is bit-identical and the statistics are the
warm-up's again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import nn

from mmke.errors import ConfigError
from mmke.methods._keyvalue import add_to_weight
from mmke.methods.base import (
    EditCollapsed,
    Editor,
    EditorNotReadyError,
    ParamEdited,
    check_finite,
    restore_params,
    snapshot,
    trainable_only,
)
from mmke.methods.memit import edited_layers
from mmke.models.base import LVLM
from mmke.models.batch import Batch
from mmke.registry import register_method
from mmke.types import EditCase

#: The paper's ε in ``(z − μ) / (σ + ε)``: float32's machine epsilon (its features are float32).
EPS = float(torch.finfo(torch.float32).eps)


@dataclass(frozen=True)
class UltraEditConfig:
    """UltraEdit settings (defaults: the paper's, but see ``layers``, ``lr`` and ``warmup``).

    ``layers``: decoder layer indices whose MLP output projection is edited (negative from the
    last). ``lr``: the gradient step the value targets stand for. ``ridge``: λ of the solve (the
    paper's identity). ``warmup``: train cases whose edit features pre-fill the statistics (0: the
    paper's cold start, no train step). ``batch_size``: cases per forward/backward pass (memory
    only: a case's features do not depend on it).
    """

    layers: tuple[int, ...] = (-3, -2)
    lr: float = 1e-6
    ridge: float = 1.0
    warmup: int = 100
    batch_size: int = 16

    def __post_init__(self) -> None:
        if not self.layers:
            raise ConfigError("ultraedit layers must name at least one layer, e.g. layers=[-2]")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"ultraedit lr must be a finite number > 0, got {self.lr}")
        if not (self.ridge > 0 and math.isfinite(self.ridge)):
            raise ConfigError(f"ultraedit ridge must be a finite number > 0, got {self.ridge}")
        if self.warmup < 0:
            raise ConfigError(f"ultraedit warmup must be >= 0 (0: no warm-up), got {self.warmup}")
        if self.batch_size < 1:
            raise ConfigError(f"ultraedit batch_size must be >= 1, got {self.batch_size}")


# --- lifelong normalisation ---------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # tensors: compare moments by identity
class Moments:
    """Running statistics of one layer's features ``z`` (F,): count, mean and sum of squared
    deviations ``s²``, in float64. Immutable: an update returns new moments, so a handle rolls
    back by keeping the old ones.
    """

    count: int
    mean: torch.Tensor  # (F,)
    m2: torch.Tensor  # (F,)

    @classmethod
    def empty(cls, size: int, device: torch.device | str) -> Moments:
        zeros = torch.zeros(size, dtype=torch.float64, device=device)
        return cls(0, zeros, zeros)

    def update(self, z: torch.Tensor) -> Moments:
        """Fold in a turn's features ``z`` (n, F): the moments of everything seen, exactly."""
        n, seen = z.shape[0], self.count
        total = seen + n
        z = z.to(self.mean.device, torch.float64)
        turn_mean = z.mean(0)  # (F,)
        delta = turn_mean - self.mean  # (F,)
        mean = self.mean + delta * (n / total)
        m2 = self.m2 + ((z - turn_mean) ** 2).sum(0) + delta**2 * (seen * n / total)
        return Moments(total, mean, m2)

    @property
    def std(self) -> torch.Tensor:
        """Sample standard deviation (F,); 0 while only one feature has been seen."""
        return (self.m2 / max(self.count - 1, 1)).sqrt()

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """``(z − μ) / (σ + ε)`` for features (n, F), in float64."""
        return (z.to(self.mean.device, torch.float64) - self.mean) / (self.std + EPS)


@dataclass
class Lifelong:
    """One model's lifelong state: the statistics per edited site and the live edits, oldest first."""

    moments: dict[str, Moments] = field(default_factory=dict)
    edits: list[UltraEdited] = field(default_factory=list)


class UltraEdited(ParamEdited):
    """Shifted weights (restored from their snapshot) and the statistics before this turn (put back)."""

    def __init__(
        self,
        model: LVLM,
        saved: dict[str, torch.Tensor],
        state: Lifelong,
        before: dict[str, Moments],
        details: dict[str, Any],
    ) -> None:
        super().__init__(model, saved, details)
        self.state = state
        self.before = before
        state.edits.append(self)

    def _release(self) -> None:
        # an older turn's snapshot predates the later shifts: restoring it first would drop them
        if self.state.edits[-1] is not self:
            raise RuntimeError("ultraedit: restore the later edits of this model first (newest first)")
        self.state.edits.pop()
        super()._release()
        self.state.moments = self.before


# --- the editor ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Features:
    """One turn's features per edited site: keys (n, I) and output gradients (n, D) in float32."""

    keys: list[torch.Tensor]
    grads: list[torch.Tensor]
    loss: float  # mean over cases of each case's target NLL before the turn


@register_method("ultraedit")
class UltraEdit(Editor[UltraEditConfig]):
    """UltraEdit: closed-form shifts of MLP output projections from normalised keys and gradients."""

    name = "ultraedit"
    defaults = UltraEditConfig()
    batches = True

    def __init__(self, config: UltraEditConfig | dict[str, Any] | None = None) -> None:
        super().__init__(config)
        self._lifelong: WeakKeyDictionary[LVLM, Lifelong] = WeakKeyDictionary()

    def sites(self, model: LVLM) -> list[str]:
        """The MLP output projections this editor shifts in ``model``."""
        return [model.layout.mlp_out(i) for i in edited_layers(model.layout.n_layers, self.config.layers)]

    def statistics(self, model: LVLM) -> dict[str, Moments]:
        """The current lifelong statistics of ``model`` per site (empty before any turn or warm-up)."""
        state = self._lifelong.get(model)
        return dict(state.moments) if state else {}

    @property
    def needs_train_cases(self) -> bool:
        return self.config.warmup > 0

    def train(self, model: LVLM, train_cases: Sequence[EditCase]) -> None:
        """Start the statistics from the edit features of the first ``warmup`` usable train cases."""
        if self.config.warmup == 0:
            return
        state = self._lifelong.setdefault(model, Lifelong())
        if state.edits:
            raise RuntimeError("ultraedit: restore this model's live edits before warming up again")
        usable = [c for c in train_cases if c.edit.image is None or model.family.multimodal]
        cases = usable[: self.config.warmup]
        if not cases:
            raise EditorNotReadyError(
                "ultraedit: no train case to warm the statistics up with (set warmup=0 for a cold start)"
            )
        sites = self.sites(model)
        feats = self._features(model, [model.layout.module(s) for s in sites], cases)
        state.moments = _fold(sites, {}, feats)

    def apply(self, model: LVLM, case: EditCase) -> UltraEdited:
        return self.apply_many(model, [case])

    def apply_many(self, model: LVLM, cases: Sequence[EditCase]) -> UltraEdited:
        """One turn: every case's features (``batch_size`` cases per pass), one statistics update and one
        solve per layer, written together."""
        if not cases:
            raise ValueError("ultraedit apply_many needs at least one case")
        state = self._state(model)
        sites = self.sites(model)
        modules = [model.layout.module(site) for site in sites]
        params = {f"{site}.weight": module.weight for site, module in zip(sites, modules, strict=True)}
        saved, before = snapshot(params), dict(state.moments)
        try:
            feats = self._features(model, modules, cases)
            moments = _fold(sites, before, feats)
            norms = [
                self._shift(module, moments[site], keys, grads)
                for site, module, keys, grads in zip(sites, modules, feats.keys, feats.grads, strict=True)
            ]
            check_finite(params, self.name, 0)
        except BaseException:  # collapsed, interrupted or failed: leave model and statistics as they were
            restore_params(model.model, saved)
            raise
        state.moments = moments
        details = {
            "layers": edited_layers(model.layout.n_layers, self.config.layers),
            "tokens": int(feats.keys[0].shape[0]),
            "loss": feats.loss,
            "shift_norms": norms,
            "seen": moments[sites[0]].count,
            "cases": len(cases),
        }
        return UltraEdited(model, saved, state, before, details)

    def _state(self, model: LVLM) -> Lifelong:
        state = self._lifelong.get(model)
        if state is None and self.config.warmup > 0:
            raise EditorNotReadyError(
                "ultraedit: call editor.train(model, train_cases) to warm its statistics up first, "
                "or set warmup=0 (the paper's cold start)"
            )
        return state if state is not None else self._lifelong.setdefault(model, Lifelong())

    def _features(self, model: LVLM, modules: Sequence[nn.Module], cases: Sequence[EditCase]) -> Features:
        size = self.config.batch_size
        groups = [cases[i : i + size] for i in range(0, len(cases), size)]
        chunks = [edit_features(model, modules, model.encode([c.edit for c in group])) for group in groups]
        keys = [torch.cat([c.keys[j] for c in chunks]) for j in range(len(modules))]
        grads = [torch.cat([c.grads[j] for c in chunks]) for j in range(len(modules))]
        loss = sum(c.loss * len(g) for c, g in zip(chunks, groups, strict=True)) / len(cases)
        if not math.isfinite(loss) or not all(bool(torch.isfinite(g).all()) for g in grads):
            raise EditCollapsed(f"ultraedit: the edit loss or its gradient is not finite ({loss})", 0)
        return Features(keys, grads, loss)

    def _shift(self, module: nn.Module, moments: Moments, keys: torch.Tensor, grads: torch.Tensor) -> float:
        """Write this layer's ridge shift for the turn's keys and value targets; return its norm."""
        values = value_targets(moments, keys, grads, self.config.lr)  # (n, D)
        shift = ridge_shift(keys, values, self.config.ridge)  # (D, I)
        add_to_weight(module, shift)
        return float(shift.norm())


def _fold(sites: Sequence[str], moments: dict[str, Moments], feats: Features) -> dict[str, Moments]:
    """``moments`` with the turn's features folded in, per site (new moments; the old are kept)."""
    out = dict(moments)
    for site, keys, grads in zip(sites, feats.keys, feats.grads, strict=True):
        z = torch.cat([keys, grads], dim=-1)  # (n, I + D)
        start = out.get(site) or Moments.empty(z.shape[-1], keys.device)
        out[site] = start.update(z)
    return out


# --- the mechanism (pure functions) -------------------------------------------------------


def edit_features(model: LVLM, modules: Sequence[nn.Module], batch: Batch) -> Features:
    """Each module's input (n, I) and the loss gradient at its output (n, D), at the n positions
    that predict answer tokens (item-major), from one forward and one backward pass.

    The loss is the sum over items of each item's mean target NLL. A zero tensor added to each
    module's output is what is differentiated: no weight needs a gradient, and every path from
    one edited layer to the loss (through later edited layers too) stays in the graph.
    """
    shape = tuple(batch.labels.shape)  # (B, T)
    rows, cols = batch.answer_positions  # (N,), (N,)
    at = (rows, cols - 1)
    keys: dict[int, torch.Tensor] = {}
    zeros: dict[int, torch.Tensor] = {}

    def tap(index: int) -> Any:
        def hook(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            keys[index] = args[0].detach().reshape(*shape, -1)[at].float()  # (n, I)
            zeros[index] = torch.zeros_like(out, requires_grad=True)  # (..., D)
            return out + zeros[index]

        return hook

    handles = [m.register_forward_hook(tap(i)) for i, m in enumerate(modules)]
    try:
        with trainable_only(model.model, {}), torch.enable_grad():
            loss = model.loss(batch) * batch.size  # sum over items of each item's mean NLL
            grads = torch.autograd.grad(loss, [zeros[i] for i in range(len(modules))])
    finally:
        for handle in handles:
            handle.remove()
    values = [g.reshape(*shape, -1)[at].float() for g in grads]  # (n, D) each
    return Features([keys[i] for i in range(len(modules))], values, float(loss.detach()) / batch.size)


def value_targets(moments: Moments, keys: torch.Tensor, grads: torch.Tensor, lr: float) -> torch.Tensor:
    """``v = −lr ‖k̂‖² ĝ`` (n, D) float64, ``[k̂ ; ĝ]`` the features normalised by ``moments``."""
    k_hat, g_hat = moments.normalise(torch.cat([keys, grads], dim=-1)).split(
        [keys.shape[-1], grads.shape[-1]], dim=-1
    )  # (n, I), (n, D)
    return -lr * (k_hat**2).sum(-1, keepdim=True) * g_hat


def ridge_shift(keys: torch.Tensor, values: torch.Tensor, ridge: float) -> torch.Tensor:
    """``ΔW`` (D, I) minimising ``‖K ΔWᵀ − V‖² + λ ‖ΔW‖²``: ``ΔWᵀ = (KᵀK + λ I)⁻¹ KᵀV``, float64.

    With fewer keys than inputs the same solution is ``Kᵀ (KKᵀ + λ I)⁻¹ V`` (push-through identity),
    an (n, n) system instead of an (I, I) one.
    """
    k = keys.double()  # (n, I)
    v = values.to(k.device, torch.float64)  # (n, D)
    n, width = k.shape
    if n < width:
        gram = k @ k.T  # (n, n)
        gram.diagonal().add_(ridge)
        return (k.T @ torch.linalg.solve(gram, v)).T  # (D, I)
    gram = k.T @ k  # (I, I)
    gram.diagonal().add_(ridge)
    return torch.linalg.solve(gram, k.T @ v).T  # (D, I)
