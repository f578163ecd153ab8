"""MEND: a meta-trained network turns the edit's rank-one gradient factors into a weight update
(Mitchell et al. 2022, "Fast Model Editing at Scale"), as VLKEB / MMKE-Bench train it for LVLMs.

Per edited weight shape, one gradient transform (shared by the layers with that shape): the
inputs ``u`` and output gradients ``δ`` of every token are normalised with running statistics,
concatenated, passed through a residual MLP with a low-rank hidden layer (output layer zero-initialised,
so the untrained editor is the normalised gradient step) and split back into ``ũ``, ``δ̃``;
``ΔW = -lr_l · Σ_t δ̃_tᵀ ũ_t`` with a learned step size per edited weight. Per-site scale and
shift of the hidden layer play the role of MEND's per-layer "modes". The learned step sizes live
in log space (one Adam learning rate then suits them and the MLPs, where the reference uses a
separate ``lr_lr``). Meta loss and edited weights: see ``mmke.methods._hyper``.
"""

from __future__ import annotations

import math
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
class MENDConfig(HyperConfig):
    """MEND settings: hidden ``rank`` of the transforms, ``shared`` across same-shape weights,
    initial per-weight step size ``edit_lr``. The reference uses rank 1920, edit_lr 1e-4, c_edit 0.1;
    on the world model c_edit 0.1 keeps locality but edits half the cases, 0.25 trades better.
    """

    rank: int = 64
    shared: bool = True
    edit_lr: float = 1e-3
    c_edit: float = 0.25
    train_steps: int = 1000
    train_batch: int = 2
    train_lr: float = 1e-3

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"mend rank must be >= 1, got {self.rank}")
        if not self.edit_lr > 0:
            raise ConfigError(f"mend edit_lr must be > 0, got {self.edit_lr}")
        super().__post_init__()


class GradientTransform(nn.Module):
    """MEND's network for one weight shape: (u, δ) per token -> (ũ, δ̃), the identity before training."""

    def __init__(self, n_in: int, n_out: int, rank: int, n_sites: int) -> None:
        super().__init__()
        self.n_in = n_in
        width = n_in + n_out
        self.down = nn.Linear(width, rank)
        self.up = nn.Linear(rank, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.mode_scale = nn.Embedding(n_sites, rank)
        self.mode_shift = nn.Embedding(n_sites, rank)
        nn.init.ones_(self.mode_scale.weight)
        nn.init.zeros_(self.mode_shift.weight)
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("m2", torch.zeros(width))

    def forward(self, u: torch.Tensor, delta: torch.Tensor, site: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([u, delta], dim=-1)  # (n, I + D)
        if self.training:
            self._observe(x)
        x = (x - self.mean) / self._std()  # (n, I + D)
        idx = torch.tensor(site, device=x.device)
        hidden = torch.relu(self.down(x) * self.mode_scale(idx) + self.mode_shift(idx))  # (n, rank)
        y = x + self.up(hidden)  # (n, I + D)
        return y[:, : self.n_in], y[:, self.n_in :]  # (n, I), (n, D)

    def _std(self) -> torch.Tensor:
        if float(self.count) < 2:
            return torch.ones_like(self.mean)
        return (self.m2 / (self.count - 1)).clamp_min(1e-12).sqrt()  # (I + D,)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        """Merge a batch of rows into the running mean and variance (Chan et al.'s parallel update)."""
        n = x.shape[0]
        batch_mean = x.mean(0)  # (I + D,)
        batch_m2 = ((x - batch_mean) ** 2).sum(0)  # (I + D,)
        total = self.count + n
        shift = batch_mean - self.mean
        self.mean += shift * n / total
        self.m2 += batch_m2 + shift**2 * self.count * n / total
        self.count += n


class MENDNets(nn.Module):
    """The transforms (one per shape if shared, else per site) and the per-site log step sizes."""

    def __init__(self, shapes: Sequence[tuple[int, int]], rank: int, shared: bool, edit_lr: float) -> None:
        super().__init__()
        self.keys = [f"w{d}x{i}" if shared else f"site{n}" for n, (d, i) in enumerate(shapes)]
        self.transforms = nn.ModuleDict()
        for key, (d, i) in zip(self.keys, shapes, strict=True):
            if key not in self.transforms:
                self.transforms[key] = GradientTransform(i, d, rank, len(shapes))
        self.log_lrs = nn.Parameter(torch.full((len(shapes),), math.log(edit_lr)))

    def update(self, site: int, factors: Factors) -> torch.Tensor:
        u, delta = self.transforms[self.keys[site]](factors.u, factors.delta, site)  # (n, I), (n, D)
        return -self.log_lrs[site].exp() * (delta.T @ u)  # (D, I)


@register_method("mend")
class MEND(HyperEditor[MENDConfig]):
    """MEND: gradient factors of the edit -> trained transforms -> ΔW on the last layers' MLP weights."""

    name = "mend"
    defaults = MENDConfig()
    batch_refusal = "its editor network was meta-trained on one edit per update"

    def build(self, model: LVLM) -> MENDNets:
        shapes = [tuple(w.shape) for w in site_weights(model, self.sites(model)).values()]
        cfg = self.config
        nets = MENDNets(shapes, cfg.rank, cfg.shared, cfg.edit_lr)  # type: ignore[arg-type]
        return nets.to(model.device)

    def deltas(
        self, model: LVLM, nets: nn.Module, case: EditCase, factors: Mapping[str, Factors]
    ) -> dict[str, torch.Tensor]:
        nets = cast(MENDNets, nets)  # what build() made
        return {site: nets.update(n, f) for n, (site, f) in enumerate(factors.items())}
