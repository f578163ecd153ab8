"""What the hyper-network editors (MEND, KE) share: edited weights, gradient factors, the meta loss, apply.

Both turn the edit's NLL gradient on the MLP weights of a few decoder layers into a weight update
with a trained network. Edited weights: every ``nn.Linear`` inside ``layout.mlp_modules(l)`` of
the configured layers (gate/up/down for LLaMA-style MLPs; fc1 and fc2 for OPT, whose layers have
no MLP block). Biases are never edited.
The gradient is read as rank-one factors per token, ``grad W = δᵀu`` with ``u`` the Linear's
input and ``δ`` the gradient of the loss w.r.t. its output, over the non-padding tokens.
Meta-training runs the post-edit model through the ordinary ``LVLM.logits`` with ``W + Δ``
substituted for ``W`` (``substituted``), so the loss reaches the editor's networks.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from mmke.errors import ConfigError
from mmke.methods.base import EditCollapsed, ParamEdited, check_finite, restore_params, snapshot
from mmke.methods.trainable import TrainableEditor, TrainingConfig
from mmke.models.base import LVLM, Item
from mmke.models.batch import Batch
from mmke.models.layout import LayoutError
from mmke.types import LOCALITY_KINDS, EditCase, ProbeKind

GENERALITY_KINDS = (ProbeKind.TEXT_GENERALITY, ProbeKind.IMAGE_GENERALITY)


@dataclass(frozen=True)
class HyperConfig(TrainingConfig):
    """Settings MEND and KE share: edited ``layers`` (decoder indices) and the meta-loss weights.

    Meta loss = ``c_edit`` · NLL(edit + generality probes, edited model)
    + ``c_loc`` · KL(pre-edit ‖ post-edit) over the locality probes' answer spans.
    """

    layers: tuple[int, ...] = (-3, -2, -1)
    c_edit: float = 1.0
    c_loc: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))  # lists from YAML / direct calls
        if not self.layers:
            raise ConfigError("layers needs at least one decoder layer index")
        if self.c_edit < 0 or self.c_loc < 0 or self.c_edit + self.c_loc == 0:
            raise ConfigError("c_edit and c_loc must be >= 0 and not both 0")
        super().__post_init__()


# --- edited weights -----------------------------------------------------------------------------


def edit_sites(model: LVLM, layers: Sequence[int]) -> list[str]:
    """Module names of the Linears edited in ``layers`` (negative indices past the first layer clamp to it).

    So the default last three layers become layers 0-1 on a 2-layer model; duplicates count once.
    """
    n = model.layout.n_layers
    picked = sorted({max(i + n, 0) if i < 0 else i for i in layers})
    sites: list[str] = []
    for layer in picked:
        for mlp in model.layout.mlp_modules(layer):
            for name, module in model.layout.module(mlp).named_modules():
                if isinstance(module, nn.Linear):
                    sites.append(f"{mlp}.{name}" if name else mlp)
    if not sites:
        raise LayoutError(f"{type(model.model).__name__}: no Linear inside the MLPs of layers {picked}")
    return sites


def site_weights(model: LVLM, sites: Sequence[str]) -> dict[str, nn.Parameter]:
    """The weight matrix (D, I) of each edited Linear, by full parameter name."""
    return {f"{s}.weight": model.model.get_parameter(f"{s}.weight") for s in sites}


@dataclass
class Factors:
    """One Linear's gradient as per-token factors: inputs ``u`` (n, I), output gradients ``delta`` (n, D)."""

    u: torch.Tensor
    delta: torch.Tensor

    def grad(self) -> torch.Tensor:
        return self.delta.T @ self.u  # (D, I)


def gradient_factors(model: LVLM, sites: Sequence[str], batch: Batch) -> dict[str, Factors]:
    """Each site's (u, δ) for the mean target NLL of ``batch``, on its non-padding tokens (detached, fp32).

    δ is read by adding a zero tensor to the site's output and differentiating w.r.t. it, so no
    model parameter needs ``requires_grad``.
    """
    inputs: dict[str, torch.Tensor] = {}
    taps: dict[str, torch.Tensor] = {}

    def tap(site: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            inputs[site] = args[0].detach()
            taps[site] = torch.zeros_like(out, requires_grad=True)
            return out + taps[site]

        return hook

    handles = [model.layout.module(s).register_forward_hook(tap(s)) for s in sites]
    try:
        with torch.enable_grad():
            loss = model.loss(batch)
            grads = torch.autograd.grad(loss, [taps[s] for s in sites])
    finally:
        for h in handles:
            h.remove()
    keep = _kept_tokens(batch)  # (B*T,)
    return {
        s: Factors(_token_rows(inputs[s], keep), _token_rows(g, keep))
        for s, g in zip(sites, grads, strict=True)
    }


def _kept_tokens(batch: Batch) -> torch.Tensor:
    mask = batch.inputs.get("attention_mask")
    if mask is None or tuple(mask.shape) != tuple(batch.labels.shape):
        return torch.ones(batch.labels.numel(), dtype=torch.bool, device=batch.labels.device)
    return mask.reshape(-1).bool()  # (B*T,)


def _token_rows(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    if x.shape[:-1].numel() != keep.numel():
        raise RuntimeError(f"layer tensor {tuple(x.shape)} does not line up with {keep.numel()} tokens")
    return x.reshape(-1, x.shape[-1])[keep].float()  # (n, X)


@contextmanager
def substituted(root: nn.Module, values: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """While active, each named parameter is replaced by a plain (differentiable) tensor.

    The parameters come back in ``finally``, in their original order (so ``state_dict`` and the
    model fingerprint are unchanged).
    """
    owners: dict[int, tuple[nn.Module, dict[str, nn.Parameter | None]]] = {}
    placed: list[tuple[nn.Module, str]] = []
    try:
        for name, value in values.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = root.get_submodule(owner_name)
            owners.setdefault(id(owner), (owner, dict(owner._parameters)))
            owner._parameters.pop(leaf)
            setattr(owner, leaf, value)
            placed.append((owner, leaf))
        yield
    finally:
        for owner, leaf in placed:
            delattr(owner, leaf)
        for owner, params in owners.values():
            owner._parameters.clear()
            owner._parameters.update(params)


# --- meta loss --------------------------------------------------------------------------------


def grouped_batches(model: LVLM, items: Sequence[Item]) -> list[Batch]:
    """Items encoded as at most two batches: text-only ones and those with an image."""
    groups = [[it for it in items if it.image is None], [it for it in items if it.image is not None]]
    return [model.encode(g) for g in groups if g]


def answer_nll(model: LVLM, batches: Sequence[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over items of each item's mean target NLL, and the answer-token accuracy (both scalars)."""
    per_item, correct = [], []
    for batch in batches:
        logits = model.logits(batch).float()  # (N, V)
        nll = F.cross_entropy(logits, batch.answer_labels, reduction="none")  # (N,)
        rows, _ = batch.answer_positions  # (N,)
        lengths = torch.tensor(batch.answer_lengths, dtype=nll.dtype, device=nll.device)  # (B,)
        per_item.append(torch.zeros_like(lengths).index_add(0, rows, nll) / lengths)  # (B,)
        correct.append(logits.argmax(-1) == batch.answer_labels)  # (N,)
    return torch.cat(per_item).mean(), torch.cat(correct).float().mean()


def locality_kl(pre: Sequence[torch.Tensor], post: Sequence[torch.Tensor]) -> torch.Tensor:
    """KL(pre ‖ post) per answer token, averaged over all tokens of all batches (scalar)."""
    p_log = torch.cat([F.log_softmax(x.float(), -1) for x in pre])  # (N, V)
    q_log = torch.cat([F.log_softmax(x.float(), -1) for x in post])  # (N, V)
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean()


H = TypeVar("H", bound=HyperConfig)


class HyperEditor(TrainableEditor[H], Generic[H]):
    """A trained network maps the edit's gradient factors to weight updates (``deltas``); the rest is here."""

    @abstractmethod
    def deltas(
        self, model: LVLM, nets: nn.Module, case: EditCase, factors: Mapping[str, Factors]
    ) -> dict[str, torch.Tensor]:
        """ΔW (D, I) per site (keys of ``factors``), differentiable w.r.t. ``nets``."""

    def penalty(self, deltas: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """An extra meta-loss term on the updates (KE's magnitude constraint); none by default."""
        return torch.zeros(()), {}

    def sites(self, model: LVLM) -> list[str]:
        return edit_sites(model, self.config.layers)

    # --- training ------------------------------------------------------------------------------

    def meta_loss(
        self, model: LVLM, nets: nn.Module, cases: Sequence[EditCase]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        sites = self.sites(model)
        total = torch.zeros((), device=model.device)
        stats: dict[str, float] = {}
        for case in cases:
            loss, case_stats = self._case_loss(model, nets, case, sites)
            total = total + loss / len(cases)
            for key, value in case_stats.items():
                stats[key] = stats.get(key, 0.0) + value / len(cases)
        return total, stats

    def _case_loss(
        self, model: LVLM, nets: nn.Module, case: EditCase, sites: list[str]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        factors = gradient_factors(model, sites, model.encode([case.edit]))
        deltas = self.deltas(model, nets, case, factors)
        generality = [p for kind in GENERALITY_KINDS for p in case.probes_of(kind)]
        edit_batches = grouped_batches(model, [case.edit, *generality])
        loc_batches = grouped_batches(model, [p for p in case.probes if p.kind in LOCALITY_KINDS])
        with torch.no_grad():
            pre = [model.logits(b) for b in loc_batches]  # [(N, V)]
        with substituted(model.model, _edited_values(model, deltas)):
            edit_nll, edit_acc = answer_nll(model, edit_batches)
            post = [model.logits(b) for b in loc_batches]  # [(N, V)]
        loc = locality_kl(pre, post) if pre else torch.zeros((), device=edit_nll.device)
        extra, extra_stats = self.penalty(deltas)
        loss = cfg.c_edit * edit_nll + cfg.c_loc * loc + extra.to(edit_nll.device)
        stats = {
            "edit_nll": float(edit_nll.detach()),
            "edit_acc": float(edit_acc),
            "loc_kl": float(loc.detach()),
        }
        return loss, stats | extra_stats

    # --- editing -----------------------------------------------------------------------------

    def apply(self, model: LVLM, case: EditCase) -> ParamEdited:
        """Compute ΔW once with the trained networks and add it to the weights in place."""
        nets = self.networks(model)
        sites = self.sites(model)
        weights = site_weights(model, sites)
        factors = gradient_factors(model, sites, model.encode([case.edit]))
        was_training = nets.training
        nets.eval()
        try:
            with torch.no_grad():
                deltas = self.deltas(model, nets, case, factors)
        finally:
            nets.train(was_training)
        saved = snapshot(weights)
        with torch.no_grad():
            for site, delta in deltas.items():
                weights[f"{site}.weight"].add_(delta.to(weights[f"{site}.weight"].dtype))
        try:
            check_finite(weights, self.name, 0)
        except EditCollapsed:
            restore_params(model.model, saved)
            raise
        norms = {site: float(d.norm()) for site, d in deltas.items()}
        return ParamEdited(model, saved, details={"delta_norm": norms})


def _edited_values(model: LVLM, deltas: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """W + Δ per edited weight, in the weight's dtype (gradients flow to Δ only)."""
    out: dict[str, torch.Tensor] = {}
    for site, delta in deltas.items():
        weight = model.model.get_parameter(f"{site}.weight")
        out[f"{site}.weight"] = weight.detach() + delta.to(weight.dtype)
    return out
