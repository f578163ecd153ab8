"""FT: fine-tune one edit site on the edit's target NLL, as FT-LLM / FT-Alignment / FT-Vis are run in
VLKEB (Huang et al. 2024, "VLKEB: A Large Vision-Language Model Knowledge Editing Benchmark") and
MMKE-Bench (Du et al. 2025, "MMKE-Bench: A Multimodal Editing Benchmark for Diverse Visual Knowledge").

Per case: AdamW on the site's parameters for ``steps`` steps, minimising the target-token NLL of
the edit prompt (+ image); no locality term, no early stop unless ``stop_at_loss`` is set. The
anchors' AdamW carries PyTorch's default weight decay 0.01 (their yaml ``weight_decay: 0`` is never
passed), hence our default. The site is a role resolved through ``model.layout``, never a name.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from mmke.errors import ConfigError
from mmke.methods.base import (
    EditCollapsed,
    Editor,
    ParamEdited,
    check_finite,
    frozen_prefix_replayed,
    restore_params,
    snapshot,
    trainable_only,
)
from mmke.models.base import LVLM
from mmke.models.batch import Batch
from mmke.models.layout import Layout
from mmke.registry import register_method
from mmke.types import EditCase

#: Sites by role: language MLPs, the vision->language projector/connector, BLIP-2's Q-Former
#: (VLKEB's FT-Alignment for BLIP-2), and vision-tower layers.
SITES = ("llm", "projector", "qformer", "vision")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FTConfig:
    """FT settings. ``layers`` picks decoder layers (site llm) or vision layers (site vision)."""

    site: str = "llm"
    layers: tuple[int, ...] = (-1,)
    steps: int = 10
    lr: float = 1e-4
    weight_decay: float = 0.01
    stop_at_loss: float | None = None
    #: compute the stages before the site once per edit, not once per step (same numbers; faster)
    replay_prefix: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))  # lists from YAML / direct calls
        if self.site not in SITES:
            raise ConfigError(f"ft site {self.site!r} is not one of {', '.join(SITES)}")
        if self.site in ("llm", "vision") and not self.layers:
            raise ConfigError(f"ft site {self.site!r} needs at least one entry in 'layers'")
        if self.steps < 1:
            raise ConfigError(f"ft steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ConfigError(f"ft lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"ft weight_decay must be >= 0, got {self.weight_decay}")


@register_method("ft")
class FineTune(Editor[FTConfig]):
    """FT: fine-tune one site (llm MLPs by default) on the edit's target NLL with AdamW."""

    name = "ft"
    defaults = FTConfig()
    batches = True

    def site_modules(self, layout: Layout) -> list[str]:
        """Module names of the configured site in this model."""
        cfg = self.config
        if cfg.site == "llm":
            return [m for i in cfg.layers for m in layout.mlp_modules(i)]
        if cfg.site == "vision":
            return [layout.vision_layer(i) for i in cfg.layers]
        if cfg.site == "projector":
            return [layout.projector()]
        return [layout.qformer()]

    def site_params(self, model: LVLM) -> dict[str, nn.Parameter]:
        """The parameters FT trains, by full name (repeated layers count once)."""
        out: dict[str, nn.Parameter] = {}
        for site in self.site_modules(model.layout):
            out |= model.layout.params(site)
        return out

    def apply(self, model: LVLM, case: EditCase) -> ParamEdited:
        return self.apply_many(model, [case])

    def apply_many(self, model: LVLM, cases: Sequence[EditCase]) -> ParamEdited:
        """Fine-tune on every case's edit at once: one optimisation of the mean target NLL."""
        params = self.site_params(model)
        batch = model.encode([c.edit for c in cases])  # encoded once: the edit prompts never change
        saved = snapshot(params)
        try:
            with trainable_only(model.model, params), torch.enable_grad(), self._replay(model, params):
                losses = self._optimise(model, batch, params)
        except BaseException:  # collapsed, interrupted or failed: leave the model as it was
            restore_params(model.model, saved)
            raise
        return ParamEdited(model, saved, details={"losses": losses, "steps": len(losses)})

    def _replay(self, model: LVLM, params: dict[str, nn.Parameter]) -> AbstractContextManager[None]:
        return frozen_prefix_replayed(model, params) if self.config.replay_prefix else nullcontext()

    def _optimise(self, model: LVLM, batch: Batch, params: dict[str, nn.Parameter]) -> list[float]:
        cfg = self.config
        opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        losses: list[float] = []
        for step in range(cfg.steps):
            loss = model.loss(batch)  # scalar: mean target NLL of the edit
            value = float(loss.detach())
            if not math.isfinite(value):
                raise EditCollapsed(f"{self.name}: loss became {value} at step {step}", step)
            if not loss.requires_grad:
                # a text-only fact (CCKEB's textual edit) never reaches a vision-side site: this
                # method cannot write it, so it writes nothing rather than failing the case
                log.info("%s: the edit's inputs never reach %s; nothing written", self.name, cfg.site)
                return []
            losses.append(value)
            if cfg.stop_at_loss is not None and value <= cfg.stop_at_loss:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        # the last step's update is never seen by a loss: check the weights it wrote
        check_finite(params, self.name, len(losses))
        opt.zero_grad(set_to_none=True)
        return losses


@register_method("ft_llm")
class FineTuneLLM(FineTune):
    """FT-LLM: fine-tune the MLP of the last language-model layer (the papers' name for ``ft``)."""

    name = "ft_llm"


@register_method("ft_projector")
class FineTuneProjector(FineTune):
    """FT-Alignment: fine-tune the vision->language projector / connector (site projector)."""

    name = "ft_projector"
    defaults = FTConfig(site="projector")


@register_method("ft_vision")
class FineTuneVision(FineTune):
    """FT-Vis: fine-tune the last vision-tower layer (site vision)."""

    name = "ft_vision"
    defaults = FTConfig(site="vision")
