"""MEMIT: one edit spread over the MLP output projections of several layers (Meng et al. 2023,
"Mass-Editing Memory in a Transformer", ICLR 2023).

The edited weights are ``layout.mlp_out(l)`` (``down_proj`` / ``fc2``) for every ``l`` in
``layers``. The default ``(-3, -2, -1)`` (the last three layers) suits the 2-layer tiny models,
where indices are clipped into range and deduplicated (so it edits layers 0 and 1); the paper
edits a band of early-middle layers (3-8 of GPT-J's 28), so for a 30-layer model such as SmolLM2
set e.g. ``layers=[3, 4, 5, 6, 7, 8]``. Phases, as in the paper:

1. ``train``: the second moment ``C_l = E[k kᵀ]`` of each edited layer's inputs, exactly as ROME's
   (same corpus choice, same on-disk cache, shared in ``_keyvalue``).
2. ``z``: a ``delta`` added to the LAST edited layer's MLP output at the key position is optimised
   on the edit's target NLL (ROME's optimiser: Adam, weight decay, norm clamp). The target is
   ``z = h + delta``, ``h`` that layer's output (the residual stream) at the key position: the MLP
   output is added straight into the residual stream (pre-norm decoders: every family here), so
   both places see the same ``delta``.
3. For each edited layer ``l`` in increasing order, on the model as edited so far: the key ``k_l``
   (the layer's MLP-output input at the key position), the residual ``r_l = (z - h_cur) / (L - i)``
   (``h_cur``: the last edited layer's current output there; ``L - i`` layers are left to share what
   is still missing, so earlier layers' effect on later keys is accounted for), then
   ``ΔW_l = R Kᵀ (λ C_l + m I + K Kᵀ)⁻¹`` in float64 (a solve, never an inverse).

Regulariser (``cov_lambda``): MEMIT's solve is ``(λ C + K Kᵀ)`` with ``λ`` its ``mom2_update_weight``.
A second moment from a small corpus is singular, so, as ROME does with ``λ C / m + I``, an identity
prior scaled by ``m = tr(C) / d`` (C's mean eigenvalue) is added: ``λ C + m I`` is ROME's metric
times ``m``, in the keys' own units so ``K Kᵀ`` can be added to it. Unlike ROME's, the update is not
normalised to hit its target: a key gets the share ``s / (1 + s)`` of its residual, with
``s = kᵀ (λ C + m I)⁻¹ k``. With a full-rank ``C`` a typical key has ``s ≈ d / λ`` (``d`` the MLP
width), which is why the paper's 15000 suits GPT-J (d = 16384); the part of a key outside a small
corpus' span is carried by the ``m I`` prior, so with 105 sentences of statistics the default still
lands SmolLM2's edits (d = 1536). If the last layer falls short of ``z``, lower ``λ``.

Keys: MEMIT's point is a batch of keys ``K`` (I, n) with their residuals ``R`` (D, n). ``apply``
writes one case with ONE key per layer, at the key position (``key``: the subject's last token,
else the last prompt token, as ROME), which is the paper's choice: one key per fact, where the
subject has been read. Adding every answer-predicting position would also rewrite the mappings
of answer tokens that other prompts share. ``apply_many`` writes many cases at once, one key each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mmke.errors import ConfigError
from mmke.methods._keyvalue import (
    KeyValueConfig,
    KeyValueEditor,
    add_to_weight,
    io_at,
    key_position,
    mean_eigenvalue,
    optimise_delta,
)
from mmke.methods.base import ParamEdited, check_finite, layer_output, restore_params, snapshot
from mmke.models.base import LVLM
from mmke.models.batch import Batch
from mmke.registry import register_method
from mmke.types import EditCase


@dataclass(frozen=True)
class MemitConfig(KeyValueConfig):
    """MEMIT settings (defaults: the paper's GPT-J hyperparameters where they apply, but see ``layers``).

    ``layers`` are decoder layer indices (negative count from the last), clipped into range and
    deduplicated. ``cov_lambda`` is MEMIT's ``mom2_update_weight`` (scale it with the MLP width).
    The other settings are ROME's (``KeyValueConfig``).
    """

    method: ClassVar[str] = "memit"

    layers: tuple[int, ...] = (-3, -2, -1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.layers:
            raise ConfigError(f"{self.method} layers must name at least one layer, e.g. layers=[-2, -1]")


@dataclass(frozen=True)
class Target:
    """One case's encoded edit, its key position and the last edited layer's target output z (D,)."""

    batch: Batch
    position: int
    z: torch.Tensor
    losses: list[float]
    delta_norm: float


@register_method("memit")
class Memit(KeyValueEditor[MemitConfig]):
    """MEMIT: the edit spread over several layers' MLP output projections, keyed like ROME."""

    name = "memit"
    defaults = MemitConfig()
    batches = True

    def sites(self, model: LVLM) -> list[str]:
        return [model.layout.mlp_out(i) for i in edited_layers(model.layout.n_layers, self.config.layers)]

    def apply(self, model: LVLM, case: EditCase) -> ParamEdited:
        return self.apply_many(model, [case])

    def apply_many(self, model: LVLM, cases: Sequence[EditCase]) -> ParamEdited:
        """Write all ``cases`` in one MEMIT update (one key per case per layer); one handle restores all."""
        if not cases:
            raise ValueError(f"{self.name} apply_many needs at least one case")
        layers = edited_layers(model.layout.n_layers, self.config.layers)
        sites = [model.layout.mlp_out(layer) for layer in layers]
        states = self._layer_states(model, sites)  # before touching any weight
        modules = [model.layout.module(site) for site in sites]
        params = {f"{site}.weight": module.weight for site, module in zip(sites, modules, strict=True)}
        saved = snapshot(params)
        try:
            last = model.layout.layer(layers[-1])
            targets = [self._target(model, modules[-1], last, case) for case in cases]
            written = [
                self._write(model, module, last, targets, state, len(modules) - i)
                for i, (module, state) in enumerate(zip(modules, states, strict=True))
            ]
            check_finite(params, self.name, sum(len(t.losses) for t in targets))
        except BaseException:  # collapsed, interrupted or failed: leave the model as it was
            restore_params(model.model, saved)
            raise
        return self._edited(model, saved, edit_details(layers, targets), states, written)

    # --- the hooks a variant of the update overrides (AlphaEdit) ----------------------------

    def _layer_states(self, model: LVLM, sites: Sequence[str]) -> list[Any]:
        """What each edited layer's update needs: here its keys' second moment C."""
        return self._stats.get(model, sites)

    def _edited(
        self,
        model: LVLM,
        saved: dict[str, torch.Tensor],
        details: dict[str, Any],
        states: Sequence[Any],
        written: Sequence[Any],
    ) -> ParamEdited:
        """The handle of a finished update (``written``: what each layer's ``_write`` returned)."""
        return ParamEdited(model, saved, details)

    # --- phase 2: the target z --------------------------------------------------------------

    def _target(self, model: LVLM, mlp_out: nn.Module, last: str, case: EditCase) -> Target:
        """Optimise ``delta`` at the last edited MLP's output; ``z`` = that layer's output + delta."""
        batch = model.encode([case.edit])
        position = key_position(batch, case.edit.prompt, self.config.key, case.subject)
        _, base = io_at(model, mlp_out, batch, position)  # (D,)
        delta, losses = optimise_delta(model, mlp_out, batch, position, base, self.config, self.name)
        z = hidden_at(model, last, batch, position) + delta  # (D,)
        return Target(batch, position, z, losses, float(delta.norm()))

    # --- phase 3: spread over the layers ----------------------------------------------------

    def _write(
        self,
        model: LVLM,
        module: nn.Module,
        last: str,
        targets: Sequence[Target],
        state: Any,
        remaining: int,
    ) -> Any:
        """Give this layer ``1 / remaining`` of what each target still misses at the last layer."""
        keys, resids = keys_and_residuals(model, module, last, targets, remaining)
        memit_update(module, keys, resids, state, self.config.cov_lambda)


def keys_and_residuals(
    model: LVLM, module: nn.Module, last: str, targets: Sequence[Target], remaining: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per target, this layer's key (n, I) on the model as edited so far, and ``1 / remaining`` of
    what the last edited layer still misses of ``z`` (n, D)."""
    keys, resids = [], []
    for t in targets:
        key, _ = io_at(model, module, t.batch, t.position)  # (I,)
        keys.append(key)
        resids.append((t.z - hidden_at(model, last, t.batch, t.position)) / remaining)  # (D,)
    return torch.stack(keys), torch.stack(resids)


# --- the update ---------------------------------------------------------------------------


def memit_update(
    module: nn.Module, keys: torch.Tensor, resids: torch.Tensor, cov: torch.Tensor, cov_lambda: float
) -> None:
    """``W += R Kᵀ (λ C + m I + K Kᵀ)⁻¹`` in place (float64 solve), for keys (n, I) and residuals (n, D).

    ``m = tr(C) / d``: the identity prior of ROME's ``λ C / m + I``, in the keys' units.
    """
    k = keys.double().T  # (I, n)
    r = resids.to(k.device, torch.float64).T  # (D, n)
    cov = cov.to(k.device, torch.float64)  # (I, I)
    # built in place, the same arithmetic as λ C + m I + K Kᵀ: at a 7B model's width (I = 11008)
    # each (I, I) float64 temporary is 970 MB
    metric = cov * cov_lambda  # (I, I), symmetric
    metric.diagonal().add_(mean_eigenvalue(cov))
    metric += k @ k.T
    solved = torch.linalg.solve(metric, k)  # (I, n)
    del metric
    add_to_weight(module, r @ solved.T)  # (D, I)


def edited_layers(n_layers: int, layers: Sequence[int]) -> list[int]:
    """``layers`` as indices in ``[0, n_layers)``: negatives from the end, clipped, sorted, deduplicated."""
    return sorted({min(max(layer + n_layers if layer < 0 else layer, 0), n_layers - 1) for layer in layers})


def hidden_at(model: LVLM, site: str, batch: Batch, position: int) -> torch.Tensor:
    """The output (D,) of the decoder layer ``site`` (the residual stream) at ``position`` of item 0."""
    return layer_output(model, model.layout.module(site), batch)[0, position].float()  # (D,)


def edit_details(layers: list[int], targets: Sequence[Target]) -> dict[str, Any]:
    first = targets[0]
    return {
        "layers": layers,
        "position": first.position,
        "losses": first.losses,
        "steps": sum(len(t.losses) for t in targets),
        "delta_norm": first.delta_norm,
        "cases": len(targets),
    }
