"""GRACE: a discrete key-value adaptor on one MLP output projection that replaces its output where a
key matches (Hartvigsen et al. 2023, "Aging with GRACE: Lifelong Model Editing with Discrete
Key-Value Adaptors", NeurIPS 2023).

The adaptor wraps ``layout.mlp_out(layer)`` (EasyEdit's GRACE edits a middle layer's ``down_proj``,
layer 18 of a 32-layer LVLM; our default is the last layer: on the world model layers 1, 2 and 3
edit equally well, and a large model should set ``layer`` to a middle one as EasyEdit does).
It holds a codebook of (key, value, radius, label) entries. A key is the layer's input at the
last prompt token of the edit (the token that
predicts the first answer token; LVLM prompts have no subject token to key on, and this token has
seen the whole prompt and image), and, for a target of several tokens, at each later position that
predicts one of them (teacher-forced), labelled with the token it predicts: one replaced position
at the last layer can only move the first answer token (on the world model, 2-token targets kept
token 2 wrong at every layer tried until each answer position had its own key). Values start as
the layer's output there and are trained together with Adam for ``steps`` steps on the edit's
target NLL (EasyEdit: ``n_iter`` 20). Keys at the wrapped layer do not depend on its own output,
so they stay valid while the values train.

Matching is token-wise, as in the original GRACE: at every position whose layer input lies within
an entry's radius of its nearest key (Euclidean), the output is replaced by that entry's value;
every other position gets the wrapped layer's output unchanged (bit-identical). This needs no
knowledge of where a prompt ends, so teacher-forced scoring (prompt+target in one pass) and cached
generation see the same rule, and the value is trained under exactly the rule it is used with.
Unrelated prompts are untouched because their activations lie far from every key (on the tiny
models different tokens sit 15-35 apart, against the default radius 1).

Codebook updates follow GRACE: a key farther than ``eps`` + the nearest entry's radius adds an
entry (radius ``eps``); a nearer key with the same label expands that entry's radius to cover it
and trains its value further; with a different label it adds an entry and both radii shrink to
half the distance (split). GRACE is lifelong: a second edit at a site already wrapped adds to the
same codebook; each handle restores the codebook as it was before its edit (restore in reverse
order), and the last one puts the original module object back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmke.errors import ConfigError
from mmke.methods.base import (
    EditCollapsed,
    Edited,
    Editor,
    finite_loss,
    layer_io,
    swap_module,
    trainable_only,
    wrapper_at,
)
from mmke.models.base import LVLM
from mmke.models.batch import Batch
from mmke.registry import register_method
from mmke.types import EditCase


@dataclass(frozen=True)
class GraceConfig:
    """GRACE settings: the wrapped layer, initial deferral radius, and the value's optimiser.

    ``lr`` is EasyEdit's ``edit_lr`` (1.0): the value is one free vector per entry, so Adam's
    per-coordinate step of ~lr lets 20 steps move it as far as needed on tiny, world and 7B models.
    """

    layer: int = -1
    eps: float = 1.0
    steps: int = 20
    lr: float = 1.0

    def __post_init__(self) -> None:
        if not self.eps > 0:
            raise ConfigError(f"grace eps must be > 0, got {self.eps}")
        if self.steps < 1:
            raise ConfigError(f"grace steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ConfigError(f"grace lr must be > 0, got {self.lr}")


@dataclass
class Codebook:
    """GRACE's entries: keys (K, I), values (K, D), radii (K,) in float32, and each entry's label."""

    keys: torch.Tensor | None = None  # (K, I)
    values: torch.Tensor | None = None  # (K, D)
    radii: torch.Tensor | None = None  # (K,)
    labels: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def floats(self) -> int:
        """Size of the codebook in floats (keys, values and radii)."""
        return sum(t.numel() for t in (self.keys, self.values, self.radii) if t is not None)

    def copy(self) -> Codebook:
        """A snapshot (tensors are never changed in place, so sharing them is safe)."""
        return Codebook(self.keys, self.values, self.radii, list(self.labels))

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance to and index of the nearest key for each query row (N, I) -> (N,), (N,)."""
        assert self.keys is not None
        dist = torch.cdist(queries.float(), self.keys, compute_mode="donot_use_mm_for_euclid_dist")  # (N, K)
        return dist.min(dim=1)

    def insert(self, key: torch.Tensor, value: torch.Tensor, label: str, eps: float) -> tuple[int, str]:
        """Apply GRACE's update for a new (key, label); returns the entry to train and what was done."""
        if not len(self):
            return self._add(key, value, label, eps), "add"
        dist, idx = self.nearest(key[None])
        d, j = float(dist[0]), int(idx[0])
        assert self.radii is not None
        if d > eps + float(self.radii[j]):
            return self._add(key, value, label, eps), "add"
        if self.labels[j] != label:
            slot = self._add(key, value, label, d / 2)
            self.radii = self.radii.clone()
            self.radii[j] = d / 2
            return slot, "split"
        if d > float(self.radii[j]):
            self.radii = self.radii.clone()
            self.radii[j] = d
        return j, "expand"

    def set_values(self, slots: list[int], values: torch.Tensor) -> None:
        assert self.values is not None
        self.values = self.values.clone()
        self.values[slots] = values

    def _add(self, key: torch.Tensor, value: torch.Tensor, label: str, radius: float) -> int:
        radius_t = torch.tensor([radius], dtype=torch.float32, device=key.device)
        self.keys = _append(self.keys, key.float())
        self.values = _append(self.values, value.float())
        self.radii = radius_t if self.radii is None else torch.cat([self.radii, radius_t])
        self.labels.append(label)
        return len(self) - 1


def _append(rows: torch.Tensor | None, row: torch.Tensor) -> torch.Tensor:
    return row[None].clone() if rows is None else torch.cat([rows, row[None]])


class GraceAdaptor(nn.Module):
    """Wraps a Linear: its output, with the codebook's value wherever the input is within a key's radius.

    The codebook holds plain tensors (no parameters or buffers), so the wrapped layer's parameters
    are the adaptor's only ones. ``live`` is the (slots, values) being trained during an edit.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.codebook = Codebook()
        self.live: tuple[list[int], torch.Tensor] | None = None
        self.edits: list[GraceEdited] = []  # live handles, oldest first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x)  # (..., D)
        book = self.codebook
        if not len(book):
            return out
        assert book.radii is not None
        dist, idx = book.nearest(x.reshape(-1, x.shape[-1]))  # (N,), (N,)
        hit = dist <= book.radii[idx]  # (N,)
        if not bool(hit.any()):
            return out
        new = self._values()[idx].to(out.dtype)  # (N, D)
        flat = out.reshape(-1, out.shape[-1])  # (N, D)
        return torch.where(hit[:, None], new, flat).reshape(out.shape)

    def _values(self) -> torch.Tensor:
        values = self.codebook.values  # (K, D)
        assert values is not None
        if self.live is None:
            return values
        slots, live = self.live  # n distinct slots, (n, D)
        index = torch.tensor(slots, device=values.device)  # (n,)
        return values.index_put((index,), live.to(values.dtype))  # (K, D), differentiable in live


class GraceEdited(Edited):
    """A GRACE edit: restore puts the codebook back as it was before it (and the original module,
    when it was the first edit at this site). Live edits at one site restore in reverse order.
    """

    def __init__(
        self,
        model: LVLM,
        site: str,
        adaptor: GraceAdaptor,
        before: Codebook,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(model, details)
        self.site = site
        self.adaptor = adaptor
        self.before = before
        self._floats = adaptor.codebook.floats
        adaptor.edits.append(self)

    @property
    def edited_params(self) -> int:
        """Size in floats of the codebook this edit left (keys, values and radii of every entry)."""
        return self._floats

    def _release(self) -> None:
        if self.adaptor.edits[-1] is not self:
            raise RuntimeError(f"grace: restore the later edits at {self.site} first (reverse order)")
        self.adaptor.edits.pop()
        self.adaptor.codebook = self.before
        if not self.adaptor.edits:
            swap_module(self.model.model, self.site, self.adaptor.layer)


@register_method("grace")
class Grace(Editor[GraceConfig]):
    """GRACE: a codebook adaptor on one MLP output projection; lifelong edits share the codebook."""

    name = "grace"
    defaults = GraceConfig()
    batches = True

    def apply(self, model: LVLM, case: EditCase) -> GraceEdited:
        return self.apply_many(model, [case])

    def apply_many(self, model: LVLM, cases: Sequence[EditCase]) -> GraceEdited:
        """Every case's keys into the codebook, then all their values trained together."""
        site = model.layout.mlp_out(self.config.layer)
        adaptor = wrapper_at(model, site, GraceAdaptor)
        before = adaptor.codebook.copy()
        try:
            batch = model.encode([c.edit for c in cases])
            keys, values, labels = _keys_and_values(model, adaptor, batch)
            book, eps = adaptor.codebook, self.config.eps
            done = [book.insert(k, v, lab, eps) for k, v, lab in zip(keys, values, labels, strict=True)]
            slots = list(dict.fromkeys(slot for slot, _ in done))  # distinct, in answer order
            losses = self._train_values(model, adaptor, batch, slots)
        except BaseException:  # collapsed, interrupted or failed: leave the model as it was
            adaptor.codebook = before
            if not adaptor.edits:
                swap_module(model.model, site, adaptor.layer)
            raise
        details = {
            "losses": losses,
            "steps": len(losses),
            "actions": [a for _, a in done],
            "entries": len(adaptor.codebook),
        }
        return GraceEdited(model, site, adaptor, before, details)

    def _train_values(
        self, model: LVLM, adaptor: GraceAdaptor, batch: Batch, slots: list[int]
    ) -> list[float]:
        cfg = self.config
        assert adaptor.codebook.values is not None
        live = adaptor.codebook.values[slots].clone().requires_grad_(True)  # (n, D)
        opt = torch.optim.Adam([live], lr=cfg.lr)
        losses: list[float] = []
        adaptor.live = (slots, live)
        try:
            with trainable_only(model.model, {}), torch.enable_grad():
                for step in range(cfg.steps):
                    loss = model.loss(batch)  # scalar: mean target NLL of the edit
                    losses.append(finite_loss(float(loss.detach()), step, self.name))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        finally:
            adaptor.live = None
        if not bool(torch.isfinite(live).all()):  # the last step's update is never seen by a loss
            raise EditCollapsed(f"grace: value became non-finite at step {cfg.steps}", cfg.steps)
        adaptor.codebook.set_values(slots, live.detach())
        return losses


def _keys_and_values(
    model: LVLM, adaptor: GraceAdaptor, batch: Batch
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The wrapped layer's inputs (n, I) and outputs (n, D) at the n positions that predict the
    edits' answer tokens (per edit, the last prompt token first), and each one's label (the id it
    predicts).
    """
    rows, cols = batch.answer_positions  # (N,), (N,)
    positions = cols - 1  # (N,)
    labels = [str(int(t)) for t in batch.labels[rows, cols]]
    x, y = layer_io(model, adaptor.layer, batch)  # (B, T, I), (B, T, D)
    return x[rows, positions].float(), y[rows, positions].float(), labels
