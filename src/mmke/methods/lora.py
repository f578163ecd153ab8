"""LoRA: low-rank adapters on a site's linear layers, trained on the edit's target NLL, as the LoRA
baseline of EasyEdit / VLKEB (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models").

Per case: every ``nn.Linear`` of the site (the MLP or the self-attention of ``layers``) is wrapped
in a fresh ``peft`` LoRA layer (B = 0, so the model is unchanged until trained); AdamW trains only
the adapters for ``steps`` steps on the edit's NLL. The base weights are never written: restore
puts the original modules back, so the module tree and state_dict are exactly the pre-edit ones.
A second LoRA edit wraps the first one's wrappers (adapters on top of adapters); restore stacked
edits in reverse order.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmke.errors import ConfigError
from mmke.methods.base import (
    EditCollapsed,
    Edited,
    Editor,
    EditorNotReadyError,
    ModuleEdited,
    check_finite,
    frozen_prefix_replayed,
    trainable_only,
)
from mmke.models.base import LVLM
from mmke.models.batch import Batch
from mmke.models.layout import Layout, LayoutError
from mmke.registry import register_method
from mmke.types import EditCase

#: Sites by role: the language MLPs (``llm``) or the self-attention blocks of ``layers``.
SITES = ("llm", "attention")

#: The adapter's name inside each peft layer (one adapter per wrapper: stacking adds wrappers).
ADAPTER = "mmke"


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA settings: adapter ``rank`` and ``alpha`` (scale alpha / rank), AdamW ``steps`` and ``lr``.

    ``seed`` fixes the adapters' initialisation (A: Kaiming-uniform as in peft, B: zeros) without
    touching the global RNG, so the same edit always gives the same adapters.
    """

    site: str = "llm"
    layers: tuple[int, ...] = (-1,)
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.0
    steps: int = 10
    lr: float = 5e-3
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))  # lists from YAML / direct calls
        if self.site not in SITES:
            raise ConfigError(f"lora site {self.site!r} is not one of {', '.join(SITES)}")
        if not self.layers:
            raise ConfigError("lora needs at least one entry in 'layers'")
        if self.rank < 1:
            raise ConfigError(f"lora rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ConfigError(f"lora alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora dropout must be in [0, 1), got {self.dropout}")
        if self.steps < 1:
            raise ConfigError(f"lora steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ConfigError(f"lora lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"lora weight_decay must be >= 0, got {self.weight_decay}")


class LoRAEdited(Edited):
    """Several linear layers swapped for LoRA wrappers (one ``ModuleEdited`` each); restore unwraps all."""

    def __init__(
        self, model: LVLM, wrappers: Mapping[str, nn.Module], details: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(model, details)
        self.parts = [ModuleEdited(model, name, wrapper) for name, wrapper in wrappers.items()]

    @property
    def edited_params(self) -> int:
        return sum(part.edited_params for part in self.parts)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The trainable adapter weights, by full name in the edited model."""
        out: dict[str, nn.Parameter] = {}
        for part in self.parts:
            for sub in ("lora_A", "lora_B"):
                prefix = f"{part.site}.{sub}"
                out |= {f"{prefix}.{n}": p for n, p in getattr(part.replacement, sub).named_parameters()}
        return out

    def _release(self) -> None:
        for part in reversed(self.parts):
            part.restore()


@register_method("lora")
class LoRA(Editor[LoRAConfig]):
    """LoRA: train fresh low-rank adapters on a site's linear layers (llm MLP by default) with AdamW."""

    name = "lora"
    defaults = LoRAConfig()
    batches = True

    def site_linears(self, layout: Layout) -> list[str]:
        """Module names of the linear layers LoRA wraps (an earlier LoRA wrapper counts as one)."""
        cfg = self.config

        def pick(i: int) -> list[str]:
            return layout.mlp_modules(i) if cfg.site == "llm" else [layout.attention(i)]

        names: list[str] = []
        for site in dict.fromkeys(m for i in cfg.layers for m in pick(i)):  # repeated layers count once
            names += _linears(site, layout.module(site), _peft().LoraLayer)
        if not names:
            raise LayoutError(f"lora: the {cfg.site} site of layers {cfg.layers} holds no nn.Linear")
        return names

    def apply(self, model: LVLM, case: EditCase) -> LoRAEdited:
        return self.apply_many(model, [case])

    def apply_many(self, model: LVLM, cases: Sequence[EditCase]) -> LoRAEdited:
        """One set of adapters trained on every case's edit at once (the mean target NLL)."""
        batch = model.encode([c.edit for c in cases])  # encoded once: the edit prompts never change
        wrappers = {name: self._wrap(model.layout.module(name)) for name in self.site_linears(model.layout)}
        edited = LoRAEdited(model, wrappers)
        params = edited.adapter_params()
        try:
            with (
                trainable_only(model.model, params),
                torch.enable_grad(),
                frozen_prefix_replayed(model, params),
            ):
                losses = self._optimise(model, batch, edited, params)
        except BaseException:  # collapsed, interrupted or failed: unwrap before raising
            edited.restore()
            raise
        edited.details.update(losses=losses, steps=len(losses), modules=list(wrappers))
        return edited

    def _wrap(self, base: nn.Module) -> nn.Module:
        """A peft LoRA layer around ``base`` whose A is seeded here and whose B is zero."""
        cfg, peft = self.config, _peft()
        opts: dict[str, Any] = {"r": cfg.rank, "lora_alpha": cfg.alpha}
        if "config" in inspect.signature(peft.Linear.__init__).parameters:  # peft >= 0.18 takes a config
            opts["config"] = peft.LoraConfig(**opts, lora_dropout=cfg.dropout, init_lora_weights=True)
        else:
            opts |= {"lora_dropout": cfg.dropout, "init_lora_weights": True}
        with torch.random.fork_rng(devices=[]):  # peft's own init draws from the global RNG
            wrapper = peft.Linear(base, ADAPTER, **opts)
        a, b = wrapper.lora_A[ADAPTER].weight, wrapper.lora_B[ADAPTER].weight  # (r, in), (out, r)
        gen = torch.Generator().manual_seed(cfg.seed)
        bound = 1.0 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=sqrt(5)), as peft and nn.Linear
        with torch.no_grad():
            a.copy_(torch.empty(a.shape).uniform_(-bound, bound, generator=gen))
            b.zero_()
        return wrapper

    def _optimise(
        self, model: LVLM, batch: Batch, edited: LoRAEdited, params: dict[str, nn.Parameter]
    ) -> list[float]:
        cfg = self.config
        opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        dropouts = [part.replacement.lora_dropout for part in edited.parts]
        losses: list[float] = []
        for step in range(cfg.steps):
            for d in dropouts:  # the model stays in eval mode; only the adapters' dropout is live
                d.train()
            loss = model.loss(batch)  # scalar: mean target NLL of the edit
            value = float(loss.detach())
            if not math.isfinite(value):
                raise EditCollapsed(f"{self.name}: loss became {value} at step {step}", step)
            losses.append(value)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for d in dropouts:
            d.eval()
        # the last step's update is never seen by a loss: check the weights it wrote
        check_finite(params, self.name, len(losses))
        opt.zero_grad(set_to_none=True)
        return losses


def _peft() -> Any:
    """peft's LoRA classes (an optional dependency: ``pip install mmke[lora]``)."""
    try:
        import peft
        from peft.tuners.lora import layer
    except ImportError:
        raise EditorNotReadyError("lora needs peft: install it with `pip install 'mmke[lora]'`") from None
    return _Peft(peft.LoraConfig, layer.Linear, layer.LoraLayer)


@dataclass(frozen=True)
class _Peft:
    LoraConfig: type
    Linear: type
    LoraLayer: type


def _linears(site: str, module: nn.Module, lora_layer: type) -> list[str]:
    """Full names of the outermost linear layers under ``site``: plain ``nn.Linear`` or LoRA wrappers.

    A wrapper's insides (its base layer and adapters) are skipped, so a second edit wraps the
    first one's wrapper instead of its adapters.
    """
    found: list[str] = []
    for name, sub in module.named_modules():
        if any(name.startswith(f"{w}.") or w == "" for w in found):
            continue  # inside a layer already taken (a site that is itself a linear layer: w == "")
        if isinstance(sub, lora_layer | nn.Linear):
            found.append(name)
    return [f"{site}.{name}" if name else site for name in found]
