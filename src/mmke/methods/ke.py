"""KE (KnowledgeEditor): a hyper-network conditioned on the edit's text rescales and shifts the edit's
gradient into a weight update (De Cao et al. 2021, "Editing Factual Knowledge in Language Models"),
as VLKEB / MMKE-Bench train it for LVLMs.

The condition is the reference's ``cond`` string, ``"{ground truth} >> {target} || {prompt}"``
(text only), embedded with the LVLM's own input embedding table (used in place, frozen: the
reference copies it, we do not store a copy) and encoded by a bi-LSTM (hidden 128) into a condition
vector. Per edited matrix a conditioned parameter predicts α, γ, β, ζ and a scale s:
``ΔW = max_scale · σ(s) · (g ⊙ A + B)`` with ``A = (I·softmax(α)) ⊗ γ`` and ``B = (I·softmax(β)) ⊗ ζ``
(softmax over the input dimension, scaled to mean 1), where ``g`` is the edit's gradient scaled to
unit RMS (so ``max_scale`` sets the step whatever the loss scale; the reference uses the raw gradient).

Deviations from the reference (documented): besides the edit NLL the meta loss has the
generality NLL and the same locality KL as MEND (the reference KE has neither), and the Δ-magnitude
constraint is a fixed-weight hinge ``c_mag · max(0, lp - margin)`` (lp: RMS of Δ averaged over
the matrices) instead of a Lagrangian with a decaying margin.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from mmke.errors import ConfigError
from mmke.methods._hyper import Factors, HyperConfig, HyperEditor, site_weights
from mmke.models.base import LVLM
from mmke.registry import register_method
from mmke.types import EditCase


@dataclass(frozen=True)
class KEConfig(HyperConfig):
    """KE settings: LSTM ``hidden`` size per direction, condition vector size ``cond_dim``, the
    conditioners' ``mlp_hidden`` width, ``max_scale`` of Δ, and the magnitude hinge (``c_mag``, ``margin``).
    """

    hidden: int = 128
    cond_dim: int = 256
    mlp_hidden: int = 128
    max_scale: float = 0.01
    c_mag: float = 1.0
    margin: float = 1e-3
    train_steps: int = 1000
    train_batch: int = 2
    train_lr: float = 1e-3

    def __post_init__(self) -> None:
        if min(self.hidden, self.cond_dim, self.mlp_hidden) < 1:
            raise ConfigError("ke hidden, cond_dim and mlp_hidden must be >= 1")
        if not self.max_scale > 0 or self.c_mag < 0 or self.margin < 0:
            raise ConfigError("ke max_scale must be > 0, c_mag and margin >= 0")
        super().__post_init__()


class ConditionedParameter(nn.Module):
    """KE's per-matrix conditioner: condition (C,) and gradient (D, I) -> ΔW (D, I)."""

    def __init__(self, shape: tuple[int, int], cond_dim: int, hidden: int, max_scale: float) -> None:
        super().__init__()
        self.d, self.i = shape
        self.max_scale = max_scale
        self.net = nn.Sequential(
            nn.Linear(cond_dim, hidden), nn.Tanh(), nn.Linear(hidden, 2 * (self.d + self.i) + 1)
        )

    def forward(self, cond: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        alpha, gamma, beta, zeta, s = self.net(cond).split([self.i, self.d, self.i, self.d, 1])
        a = torch.outer(gamma, self.i * alpha.softmax(-1))  # (D, I)
        b = torch.outer(zeta, self.i * beta.softmax(-1))  # (D, I)
        g = grad / grad.pow(2).mean().sqrt().clamp_min(1e-12)  # (D, I), unit RMS
        return self.max_scale * torch.sigmoid(s) * (g * a + b)  # (D, I)


class KENets(nn.Module):
    """The bi-LSTM condition encoder and one conditioned parameter per edited matrix."""

    def __init__(self, shapes: Sequence[tuple[int, int]], emb_dim: int, cfg: KEConfig) -> None:
        super().__init__()
        self.lstm = nn.LSTM(emb_dim, cfg.hidden, batch_first=True, bidirectional=True)
        self.proj = nn.Linear(2 * cfg.hidden, cfg.cond_dim)
        self.params = nn.ModuleList(
            ConditionedParameter(shape, cfg.cond_dim, cfg.mlp_hidden, cfg.max_scale) for shape in shapes
        )

    def condition(self, embedded: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(embedded)  # h: (2, 1, H) for the input (1, T, E)
        return torch.tanh(self.proj(torch.cat([h[0, 0], h[1, 0]])))  # (C,)


def condition_text(case: EditCase) -> str:
    """The reference's conditioning string: ``"{ground truth} >> {target} || {prompt}"``."""
    edit = case.edit
    return f"{edit.ground_truth or ''} >> {edit.target} || {edit.prompt}"


@register_method("ke")
class KE(HyperEditor[KEConfig]):
    """KE: a bi-LSTM reads the edit's text; per matrix, a conditioned map of its gradient gives ΔW."""

    name = "ke"
    defaults = KEConfig()
    batch_refusal = "its hypernetwork maps one edit to one update"

    def build(self, model: LVLM) -> KENets:
        shapes = [tuple(w.shape) for w in site_weights(model, self.sites(model)).values()]
        emb_dim = model.model.get_input_embeddings().weight.shape[1]
        return KENets(shapes, emb_dim, self.config).to(model.device)  # type: ignore[arg-type]

    def deltas(
        self, model: LVLM, nets: nn.Module, case: EditCase, factors: Mapping[str, Factors]
    ) -> dict[str, torch.Tensor]:
        nets = cast(KENets, nets)  # what build() made
        cond = nets.condition(self._embedded(model, case))  # (C,)
        return {
            site: net(cond, f.grad()) for net, (site, f) in zip(nets.params, factors.items(), strict=True)
        }

    def penalty(self, deltas: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Fixed-weight hinge on lp, the RMS of Δ averaged over the edited matrices."""
        lp = torch.stack([d.pow(2).mean().sqrt() for d in deltas.values()]).mean()
        cfg = self.config
        return cfg.c_mag * torch.relu(lp - cfg.margin), {"delta_rms": float(lp.detach())}

    def _embedded(self, model: LVLM, case: EditCase) -> torch.Tensor:
        ids = model.tokenizer(condition_text(case), add_special_tokens=False)["input_ids"]
        ids_t = torch.tensor([ids], device=model.device)  # (1, T)
        with torch.no_grad():
            return model.model.get_input_embeddings()(ids_t).float()  # (1, T, E)
