"""ROME: a rank-one update of one MLP output projection (Meng et al. 2022, "Locating and Editing
Factual Associations in GPT", NeurIPS 2022).

The edited weight ``W`` is ``layout.mlp_out(layer)`` (a ``down_proj`` / ``fc2``). ``layer`` defaults
to the last one, which is right for the 2-layer tiny models only: the paper edits an early-middle
layer (layer 17 of 48 in GPT-2 XL, 5 of 28 in GPT-J), so for a 30-layer model such as SmolLM2
set e.g. ``layer=5``..``8``. Three phases, as in the paper:

1. ``train``: the second moment ``C = E[k kᵀ]`` of W's inputs over a text corpus, computed once
   with a forward hook and cached on disk (shared with MEMIT, in ``_keyvalue``). The texts are
   ``stats_texts`` (a ``.txt`` file, one text per line; for the world model pass its training
   corpus this way) or else the prompts+targets of the benchmark's train cases (edit and probes,
   with their images).
2. ``v*``: a vector ``delta`` added to W's output at the key position is optimised with Adam on the
   edit's target NLL (plus ROME's weight decay on ``delta``, and its norm clamp).
3. The rank-one update ``W += delta (C⁻¹k*)ᵀ / (k*ᵀ C⁻¹ k*)`` (solved in float64, never inverted),
   so that ``W' k* = W k* + delta = v*`` and keys ``k`` with ``kᵀ C⁻¹ k* = 0`` are untouched.

The key (``key``): the paper reads ``k*`` at the subject's last token. Most LVLM cases mark no
subject, so by default (``subject``) ``k*`` is read there when ``case.subject`` occurs in the prompt
and otherwise at the LAST PROMPT TOKEN (``prompt_end``: the position whose output predicts the
first answer token; it has seen the whole prompt and image). Beware that under a chat template
the last prompt token is the same template token for every prompt (and ``question_end``, the
prompt text's last token, is often a shared word such as "is"): on SmolLM2 an edit keyed there
rewrote all five unrelated "The capital of X is" prompts, while the subject key kept all of them.

Regulariser (``cov_lambda``): ``C`` from a small corpus is singular, and the update is invariant to
the scale of ``C``, so the solve uses ``λ C / m + I`` with ``m = tr(C) / d`` (the mean eigenvalue):
the second moment weighted ``λ`` against an identity prior, as MEMIT's ``mom2_update_weight``
(15000) weights it against the new keys. Large ``λ`` is the paper's pure ``C⁻¹``; ``λ -> 0`` gives
``u ∝ k*`` (a covariance-free rank-one update).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from mmke.methods._keyvalue import (
    KEYS,
    STATS_VERSION,
    KeyValueConfig,
    KeyValueEditor,
    add_to_weight,
    io_at,
    key_position,
    mean_eigenvalue,
    optimise_delta,
    second_moment,
)
from mmke.methods.base import EditCollapsed, ParamEdited, check_finite, restore_params, snapshot
from mmke.models.base import LVLM
from mmke.registry import register_method
from mmke.types import EditCase

# KEYS, STATS_VERSION, key_position and second_moment are re-exported: callers import them from here
__all__ = [
    "KEYS",
    "STATS_VERSION",
    "EditCollapsed",
    "Rome",
    "RomeConfig",
    "key_position",
    "rank_one_update",
    "second_moment",
]


@dataclass(frozen=True)
class RomeConfig(KeyValueConfig):
    """ROME settings: the edited ``layer`` and the shared key/value settings (``KeyValueConfig``)."""

    method: ClassVar[str] = "rome"

    layer: int = -1


@register_method("rome")
class Rome(KeyValueEditor[RomeConfig]):
    """ROME: a rank-one update of one MLP output projection, keyed on the subject (else prompt end)."""

    name = "rome"
    defaults = RomeConfig()
    batch_refusal = "a rank-one update holds one fact (MEMIT is ROME's batch form)"

    def sites(self, model: LVLM) -> list[str]:
        return [model.layout.mlp_out(self.config.layer)]

    def apply(self, model: LVLM, case: EditCase) -> ParamEdited:
        site = model.layout.mlp_out(self.config.layer)
        (cov,) = self._stats.get(model, [site])
        module = model.layout.module(site)
        params = {f"{site}.weight": module.weight}
        saved = snapshot(params)
        try:
            batch = model.encode([case.edit])
            position = key_position(batch, case.edit.prompt, self.config.key, case.subject)
            key, base = io_at(model, module, batch, position)  # (I,), (D,)
            delta, losses = optimise_delta(
                model, module, batch, position, base, self.config, self.name
            )  # (D,)
            rank_one_update(module, key, delta, cov, self.config.cov_lambda)
            check_finite(params, self.name, len(losses))
        except BaseException:  # collapsed, interrupted or failed: leave the model as it was
            restore_params(model.model, saved)
            raise
        details = {
            "position": position,
            "losses": losses,
            "steps": len(losses),
            "delta_norm": float(delta.norm()),
        }
        return ParamEdited(model, saved, details)


# --- the update -------------------------------------------------------------------------


def rank_one_update(
    module: nn.Module, key: torch.Tensor, delta: torch.Tensor, cov: torch.Tensor, cov_lambda: float
) -> None:
    """``W += delta uᵀ / (uᵀ k)`` with ``u = (λ C / m + I)⁻¹ k`` (solved in float64), in place.

    Afterwards ``W k = W_old k + delta``; ``m = tr(C) / d`` makes ``λ`` scale-free.
    """
    k = key.double()  # (I,)
    cov = cov.to(k.device, torch.float64)  # (I, I)
    # built in place, the same arithmetic as λ C / m + I: at a 7B model's width (I = 11008) each
    # (I, I) float64 temporary is 970 MB
    metric = cov * cov_lambda  # (I, I)
    metric.div_(mean_eigenvalue(cov)).diagonal().add_(1.0)
    u = torch.linalg.solve(metric, k)  # (I,)
    del metric
    update = torch.outer(delta.double(), u).div_(torch.dot(u, k))  # (D, I)
    add_to_weight(module, update)
