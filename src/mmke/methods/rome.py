"""ROME: a rank-one update of one MLP output projection (Meng et al. 2022, "Locating and Editing
Factual Associations in GPT", NeurIPS 2022).

The edited weight ``W`` is ``layout.mlp_out(layer)`` (a ``down_proj`` / ``fc2``). ``layer`` defaults
to the last one, which is right for the 2-layer tiny models only: the paper edits an early-middle
layer (layer 17 of 48 in GPT-2 XL, 5 of 28 in GPT-J), so for a 30-layer model such as SmolLM2
set e.g. ``layer=5``..``8``. Three phases, as in the paper:

1. ``train``: the second moment ``C = E[k kᵀ]`` of W's inputs over a text corpus, computed once
   with a forward hook and cached on disk. The texts are ``stats_texts`` (a ``.txt`` file, one text
   per line; for the world model pass its training corpus this way) or else the prompts+targets
   of the benchmark's train cases (edit and probes, with their images).
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

import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from mmke.cache import cache_dir
from mmke.data.images import ImageStore
from mmke.errors import ConfigError
from mmke.methods.base import (
    EditCollapsed,
    Editor,
    EditorNotReadyError,
    ParamEdited,
    check_finite,
    layer_io,
    restore_params,
    snapshot,
    trainable_only,
)
from mmke.models.base import LVLM
from mmke.models.batch import Batch
from mmke.registry import register_method
from mmke.types import EditCase, Sample

log = logging.getLogger(__name__)

#: Where k* is read: the last token before the answer, the last token of the user's prompt text, or
#: the last token of ``case.subject`` in the prompt (the paper's choice; prompt_end when a case has none).
KEYS = ("prompt_end", "question_end", "subject")

#: Bumped when what the cached statistics mean changes, so old cache files are never read.
STATS_VERSION = 1


@dataclass(frozen=True)
class RomeConfig:
    """ROME settings (defaults: the paper's GPT-J hyperparameters where they apply).

    ``v_weight_decay`` multiplies ``‖delta‖² / ‖W k*‖²``; ``clamp_norm_factor`` caps ``‖delta‖`` at
    that multiple of ``‖W k*‖`` (0 turns the cap off). ``stats_texts`` is a ``.txt`` path (one text
    per line) or None for the train cases' prompts+targets.
    """

    layer: int = -1
    key: str = "subject"
    v_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    cov_lambda: float = 15000.0
    stats_texts: str | None = None
    stats_batch_size: int = 16

    def __post_init__(self) -> None:
        if self.key not in KEYS:
            raise ConfigError(f"rome key {self.key!r} is not one of {', '.join(KEYS)}")
        if self.v_steps < 1:
            raise ConfigError(f"rome v_steps must be >= 1, got {self.v_steps}")
        if not self.v_lr > 0:
            raise ConfigError(f"rome v_lr must be > 0, got {self.v_lr}")
        if self.v_weight_decay < 0 or self.clamp_norm_factor < 0:
            raise ConfigError("rome v_weight_decay and clamp_norm_factor must be >= 0")
        if not self.cov_lambda > 0:
            raise ConfigError(f"rome cov_lambda must be > 0, got {self.cov_lambda}")
        if self.stats_batch_size < 1:
            raise ConfigError(f"rome stats_batch_size must be >= 1, got {self.stats_batch_size}")
        if self.stats_texts is not None and not Path(self.stats_texts).is_file():
            raise ConfigError(f"rome stats_texts {self.stats_texts!r} is not a file (one text per line)")


@register_method("rome")
class Rome(Editor[RomeConfig]):
    """ROME: a rank-one update of one MLP output projection, keyed on the subject (else prompt end)."""

    name = "rome"
    defaults = RomeConfig()

    def __init__(self, config: RomeConfig | dict[str, Any] | None = None) -> None:
        super().__init__(config)
        self._stats: dict[tuple[int, str], torch.Tensor] = {}  # (id(model), site) -> C (I, I) float64

    @property
    def needs_train_cases(self) -> bool:
        return self.config.stats_texts is None

    def train(self, model: LVLM, train_cases: Sequence[EditCase], images: ImageStore | None = None) -> None:
        """Compute (or load from the cache) the second moment of the edited layer's inputs."""
        site = model.layout.mlp_out(self.config.layer)
        self._stats[(id(model), site)] = self._second_moment(model, site, train_cases, images)

    def apply(self, model: LVLM, case: EditCase, images: ImageStore | None = None) -> ParamEdited:
        site = model.layout.mlp_out(self.config.layer)
        cov = self._cov_for(model, site)
        module = model.layout.module(site)
        params = {f"{site}.weight": module.weight}
        saved = snapshot(params)
        try:
            batch = model.encode([case.edit], images)
            position = key_position(batch, case.edit.prompt, self.config.key, case.subject)
            key, base = io_at(model, module, batch, position)  # (I,), (D,)
            delta, losses = self._optimise_delta(model, module, batch, position, base)  # (D,)
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

    # --- phase 1: statistics ----------------------------------------------------------------

    def _cov_for(self, model: LVLM, site: str) -> torch.Tensor:
        cov = self._stats.get((id(model), site))
        if cov is not None:
            return cov
        if self.config.stats_texts is None:
            raise EditorNotReadyError(
                "rome has no key statistics for this model and layer: call editor.train(model, "
                "train_cases, images) first, or set stats_texts to a .txt file (one text per line)"
            )
        self.train(model, ())
        return self._stats[(id(model), site)]

    def _second_moment(
        self, model: LVLM, site: str, cases: Sequence[EditCase], images: ImageStore | None
    ) -> torch.Tensor:
        cfg = self.config
        lines = _read_lines(Path(cfg.stats_texts)) if cfg.stats_texts else None
        samples = None if lines is not None else _case_samples(cases)
        texts = (
            lines if lines is not None else [f"{s.prompt}\x1f{s.target}\x1f{s.image}" for s in samples or []]
        )
        if not texts:
            raise EditorNotReadyError(
                "rome needs texts for its key statistics: no train cases and no stats_texts"
            )
        path = cache_dir() / "rome" / f"{_stats_key(model, site, texts)}.pt"
        if path.is_file():
            log.info("rome: key statistics from %s", path)
            return torch.load(path, map_location=model.device)
        module = model.layout.module(site)
        if lines is not None:
            cov = second_moment(model, module, _text_batches(model, lines, cfg.stats_batch_size))
        else:
            cov = second_moment(
                model, module, _sample_batches(model, samples or [], images, cfg.stats_batch_size)
            )
        _save_atomic(cov.cpu(), path)
        return cov

    # --- phase 2: v* ------------------------------------------------------------------------

    def _optimise_delta(
        self, model: LVLM, module: nn.Module, batch: Batch, position: int, base: torch.Tensor
    ) -> tuple[torch.Tensor, list[float]]:
        """``delta`` (D,) added to the layer's output ``base`` = W k* (+ bias) at ``position`` that
        minimises the edit's NLL.
        """
        cfg = self.config
        delta = torch.zeros_like(base, requires_grad=True)  # (D,) float32
        opt = torch.optim.Adam([delta], lr=cfg.v_lr)
        max_norm = cfg.clamp_norm_factor * float(base.norm())
        losses: list[float] = []
        with trainable_only(model.model, {}), torch.enable_grad(), _add_at(module, batch, position, delta):
            for step in range(cfg.v_steps):
                nll = model.loss(batch)  # scalar: mean target NLL of the edit
                value = float(nll.detach())
                if not math.isfinite(value):
                    raise EditCollapsed(f"rome: loss became {value} at step {step}", step)
                losses.append(value)
                decay = cfg.v_weight_decay * delta.norm() ** 2 / base.norm().clamp_min(1e-8) ** 2
                opt.zero_grad(set_to_none=True)
                (nll + decay).backward()
                opt.step()
                if max_norm > 0:
                    with torch.no_grad():
                        delta.mul_(min(1.0, max_norm / max(float(delta.norm()), 1e-12)))
        return delta.detach(), losses


# --- shared pieces (module-level so tests and MEMIT-style methods can reuse them) -----------------


def second_moment(model: LVLM, module: nn.Module, batches: Iterator[dict[str, torch.Tensor]]) -> torch.Tensor:
    """``E[k kᵀ]`` (I, I) in float64 of ``module``'s inputs over the non-padding tokens of ``batches``."""
    total: torch.Tensor | None = None
    count = 0
    seen: dict[str, torch.Tensor] = {}

    def grab(mod: nn.Module, args: tuple[Any, ...]) -> None:
        seen["x"] = args[0].detach()

    handle = module.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            for inputs in batches:
                model.family.forward(model.model, inputs)
                mask = inputs["attention_mask"].bool()  # (B, T)
                keys = seen.pop("x").reshape(mask.numel(), -1)[mask.reshape(-1)].double()  # (n, I)
                total = keys.T @ keys if total is None else total + keys.T @ keys  # (I, I)
                count += keys.shape[0]
    finally:
        handle.remove()
    if total is None or count == 0:
        raise EditorNotReadyError("rome: the statistics texts produced no tokens")
    return total / count


def io_at(model: LVLM, module: nn.Module, batch: Batch, position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``module``'s input (I,) and output (D,) at ``position`` of item 0, in float32."""
    x, y = layer_io(model, module, batch)  # (1, T, I), (1, T, D)
    return x[0, position].float(), y[0, position].float()


def rank_one_update(
    module: nn.Module, key: torch.Tensor, delta: torch.Tensor, cov: torch.Tensor, cov_lambda: float
) -> None:
    """``W += delta uᵀ / (uᵀ k)`` with ``u = (λ C / m + I)⁻¹ k`` (solved in float64), in place.

    Afterwards ``W k = W_old k + delta``; ``m = tr(C) / d`` makes ``λ`` scale-free.
    """
    k = key.double()  # (I,)
    cov = cov.to(k.device, torch.float64)  # (I, I)
    mean_eig = torch.trace(cov) / cov.shape[0]
    metric = cov_lambda * cov / mean_eig.clamp_min(1e-30) + torch.eye(
        cov.shape[0], dtype=torch.float64, device=k.device
    )
    u = torch.linalg.solve(metric, k)  # (I,)
    update = torch.outer(delta.double(), u) / torch.dot(u, k)  # (D, I)
    weight = module.weight
    with torch.no_grad():
        upd = update.T if isinstance(module, Conv1D) else update  # HF Conv1D stores (I, D)
        weight.add_(upd.to(weight.dtype))


# --- helpers ------------------------------------------------------------------------------


def key_position(batch: Batch, prompt: str, key: str = "prompt_end", subject: str | None = None) -> int:
    """Where item 0's key is read: its last prompt token (``prompt_end``: the position whose output
    predicts the first answer token), the last token of the user's ``prompt`` text inside the
    model's template (``question_end``), or the last token of ``subject`` inside that prompt
    (``subject``: ROME's own choice; falls back to ``prompt_end`` without a subject in the prompt).
    """
    rows, cols = batch.answer_positions  # (N,), (N,)
    last = int(cols[rows == 0].min()) - 1
    if key == "prompt_end":
        return last
    text = batch.texts[0]
    start = text.rindex(prompt, 0, len(text) - 1)
    end = start + len(prompt)
    if key == "subject":
        if not subject or subject not in prompt:
            return last
        start = start + prompt.rindex(subject)
        end = start + len(subject)
    tokens = batch.token_positions(0, start, end)  # (n,)
    return min(int(tokens.max()), last) if len(tokens) else last


@contextmanager
def _add_at(module: nn.Module, batch: Batch, position: int, delta: torch.Tensor) -> Iterator[None]:
    """While active, ``delta`` (D,) is added to ``module``'s output at ``position`` of item 0."""
    shape = tuple(batch.labels.shape)

    def add(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        flat = out.reshape(*shape, -1)  # (1, T, D)
        onehot = torch.zeros(shape, dtype=out.dtype, device=out.device)  # (1, T)
        onehot[0, position] = 1
        return (flat + onehot[..., None] * delta.to(out.dtype)).reshape(out.shape)

    handle = module.register_forward_hook(add)
    try:
        yield
    finally:
        handle.remove()


def _case_samples(cases: Sequence[EditCase]) -> list[Sample]:
    """Prompt+target (+ image) of every train case's edit and probes, each once, in order."""
    out: dict[tuple[str, str, Any], Sample] = {}
    for case in cases:
        for item in (case.edit, *case.probes):
            out.setdefault(
                (item.prompt, item.target, item.image), Sample(item.prompt, item.target, item.image)
            )
    return list(out.values())


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _text_batches(model: LVLM, lines: list[str], size: int) -> Iterator[dict[str, torch.Tensor]]:
    for start in range(0, len(lines), size):
        chunk = lines[start : start + size]
        enc = model.family.preprocess(model.processor, chunk, [None] * len(chunk), "right", True)
        yield {k: v.to(model.device) for k, v in enc.inputs.items()}


def _sample_batches(
    model: LVLM, samples: list[Sample], images: ImageStore | None, size: int
) -> Iterator[dict[str, torch.Tensor]]:
    for start in range(0, len(samples), size):
        yield model.encode(samples[start : start + size], images).inputs


def _stats_key(model: LVLM, site: str, texts: list[str]) -> str:
    """Hash of where the model came from (its weights when built in memory), the site and the texts."""
    digest = hashlib.sha256()
    if model.source is not None:
        origin: str = str(Path(model.source).resolve())
    else:  # in-memory model (tests): id(model) could be reused by another process, so hash the weights
        for name, p in sorted(model.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        origin = "memory"
    head = {"v": STATS_VERSION, "origin": origin, "site": site, "dtype": str(model.dtype)}
    digest.update(json.dumps(head, sort_keys=True).encode())
    digest.update("\n".join(texts).encode())
    return digest.hexdigest()[:32]


def _save_atomic(tensor: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(tensor, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
