"""Key-value machinery shared by the locate-then-edit methods (ROME, MEMIT): key statistics, key
positions and the optimised output delta.

Both methods treat an MLP output projection ``W`` as a linear key-value memory: its input at a
token is a key ``k``, its output the value ``W k``. They need the same three things, which live
here once: the second moment ``C = E[k kᵀ]`` of a layer's keys over a corpus (cached on disk
under a hash of the model's weights, the layer and the texts),
the token whose key stands for the edit (``key_position``), and a vector added to a layer's
output at that token, optimised on the edit's target NLL (``optimise_delta``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import pickle
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from mmke.cache import cache_dir
from mmke.errors import ConfigError
from mmke.io import atomic_path
from mmke.methods.base import EditCollapsed, Editor, EditorNotReadyError, layer_io, trainable_only
from mmke.methods.trainable import model_fingerprint
from mmke.models.base import LVLM
from mmke.models.batch import Batch
from mmke.types import EditCase, Sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyValueConfig:
    """The settings ROME and MEMIT share (defaults: the papers' GPT-J hyperparameters): the key
    position, the v* optimiser, the covariance weight and where the key statistics come from.

    ``v_weight_decay`` multiplies ``‖delta‖² / ‖W k*‖²``; ``clamp_norm_factor`` caps ``‖delta‖`` at
    that multiple of ``‖W k*‖`` (0 turns the cap off). ``stats_texts`` is a ``.txt`` path (one text
    per line) or None for the train cases' prompts+targets.
    """

    method: ClassVar[str] = "rome"

    key: str = "subject"
    v_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    cov_lambda: float = 15000.0
    stats_texts: str | None = None
    stats_batch_size: int = 16

    def __post_init__(self) -> None:
        m = self.method
        if self.key not in KEYS:
            raise ConfigError(f"{m} key {self.key!r} is not one of {', '.join(KEYS)}")
        if self.v_steps < 1:
            raise ConfigError(f"{m} v_steps must be >= 1, got {self.v_steps}")
        if not self.v_lr > 0:
            raise ConfigError(f"{m} v_lr must be > 0, got {self.v_lr}")
        if self.v_weight_decay < 0 or self.clamp_norm_factor < 0:
            raise ConfigError(f"{m} v_weight_decay and clamp_norm_factor must be >= 0")
        if not self.cov_lambda > 0:
            raise ConfigError(f"{m} cov_lambda must be > 0, got {self.cov_lambda}")
        if self.stats_batch_size < 1:
            raise ConfigError(f"{m} stats_batch_size must be >= 1, got {self.stats_batch_size}")
        if self.stats_texts is not None and not Path(self.stats_texts).is_file():
            raise ConfigError(f"{m} stats_texts {self.stats_texts!r} is not a file (one text per line)")


#: Where k* is read: the last token before the answer, the last token of the user's prompt text, or
#: the last token of ``case.subject`` in the prompt (the paper's choice; prompt_end when a case has none).
KEYS = ("prompt_end", "question_end", "subject")

#: Bumped when what the cached statistics mean changes, so old cache files are never read.
#: 2: the key hashes the model's weights, not its folder's path (a model rebuilt in place was
#: served the statistics of its old weights).
STATS_VERSION = 2

#: Cache folder of the statistics. ROME and MEMIT need the very same ``E[k kᵀ]`` of an MLP output
#: projection, so they share one cache; it keeps ROME's folder name so existing caches stay valid.
STATS_DIR = "rome"


class DeltaSettings(Protocol):
    """The config fields ``optimise_delta`` reads (ROME's and MEMIT's configs both have them)."""

    @property
    def v_steps(self) -> int: ...
    @property
    def v_lr(self) -> float: ...
    @property
    def v_weight_decay(self) -> float: ...
    @property
    def clamp_norm_factor(self) -> float: ...


# --- key statistics -----------------------------------------------------------------------


class KeyStatistics:
    """One editor's second moments per (model, site): kept in memory, backed by the disk cache.

    ``stats_texts`` is a ``.txt`` path (one text per line) or None for the train cases'
    prompts+targets (edit and probes, with their images). The sites missing from the cache are
    computed together, in one pass over the texts (MEMIT edits several layers).
    """

    def __init__(self, method: str, stats_texts: str | None, batch_size: int) -> None:
        self.method = method
        self.stats_texts = stats_texts
        self.batch_size = batch_size
        self._memory: dict[tuple[int, str], torch.Tensor] = {}  # (id(model), site) -> C (I, I) float64

    def train(self, model: LVLM, sites: Sequence[str], cases: Sequence[EditCase]) -> list[torch.Tensor]:
        """Compute (or load from the cache) ``C`` of each site's inputs and keep them for ``get``."""
        covs = self._load_or_compute(model, list(sites), cases)
        for site, cov in zip(sites, covs, strict=True):
            self._memory[(id(model), site)] = cov
        return covs

    def get(self, model: LVLM, sites: Sequence[str]) -> list[torch.Tensor]:
        """``C`` (I, I) float64 of each site; computed on first use when the texts come from a file."""
        missing = [site for site in sites if (id(model), site) not in self._memory]
        if missing and self.stats_texts is None:
            raise EditorNotReadyError(
                f"{self.method} has no key statistics for this model and layer: call editor.train(model, "
                "train_cases) first, or set stats_texts to a .txt file (one text per line)"
            )
        if missing:
            self.train(model, missing, ())
        return [self._memory[(id(model), site)] for site in sites]

    def _load_or_compute(
        self, model: LVLM, sites: list[str], cases: Sequence[EditCase]
    ) -> list[torch.Tensor]:
        lines = read_lines(Path(self.stats_texts)) if self.stats_texts else None
        samples = case_samples(cases) if lines is None else []
        texts = lines if lines is not None else [f"{s.prompt}\x1f{s.target}\x1f{s.image}" for s in samples]
        if not texts:
            raise EditorNotReadyError(
                f"{self.method} needs texts for its key statistics: no train cases and no stats_texts"
            )
        paths = {site: cache_dir() / STATS_DIR / f"{stats_key(model, site, texts)}.pt" for site in sites}
        covs = {site: load_stats(paths[site], model.device) for site in sites}
        todo = [site for site in sites if covs[site] is None]
        if todo:
            if lines is not None:
                batches = text_batches(model, lines, self.batch_size)
            else:
                batches = sample_batches(model, samples, self.batch_size)
            modules = [model.layout.module(site) for site in todo]
            for site, cov in zip(todo, second_moment(model, modules, batches), strict=True):
                with atomic_path(paths[site]) as tmp:
                    torch.save(cov.cpu(), tmp)
                covs[site] = cov
        log.info("%s: key statistics from %s", self.method, ", ".join(str(paths[s]) for s in sites))
        return [covs[site] for site in sites]


def second_moment(
    model: LVLM, modules: Sequence[nn.Module], batches: Iterator[dict[str, torch.Tensor]]
) -> list[torch.Tensor]:
    """``E[k kᵀ]`` (I, I) in float64 of each module's inputs over the non-padding tokens of ``batches``."""
    totals: list[torch.Tensor | None] = [None] * len(modules)
    count = 0
    seen: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(_grab_input(seen, i)) for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            for inputs in batches:
                model.family.forward(model.model, inputs)
                mask = inputs["attention_mask"].bool().reshape(-1)  # (B*T,)
                for i in range(len(modules)):
                    keys = seen.pop(i).reshape(mask.numel(), -1)[mask].double()  # (n, I)
                    total = totals[i]
                    totals[i] = keys.T @ keys if total is None else total + keys.T @ keys  # (I, I)
                count += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise EditorNotReadyError("the key statistics texts produced no tokens")
    return [total / count for total in totals if total is not None]


def _grab_input(seen: dict[int, torch.Tensor], index: int) -> Any:
    def grab(mod: nn.Module, args: tuple[Any, ...]) -> None:
        seen[index] = args[0].detach()

    return grab


def add_to_weight(module: nn.Module, update: torch.Tensor) -> None:
    """``W += update`` in place for an update (D, I) computed in float64, in the weight's dtype.

    HF's ``Conv1D`` (GPT-2's MLP) stores its weight transposed, as (I, D).
    """
    weight = module.weight
    with torch.no_grad():
        upd = update.T if isinstance(module, Conv1D) else update  # (I, D) or (D, I)
        weight.add_(upd.to(weight.dtype))


def mean_eigenvalue(cov: torch.Tensor) -> torch.Tensor:
    """``tr(C) / d``: the scale that makes a covariance weight ``λ`` independent of the keys' size."""
    return (torch.trace(cov) / cov.shape[0]).clamp_min(1e-30)


# --- keys and values ----------------------------------------------------------------------


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


def io_at(model: LVLM, module: nn.Module, batch: Batch, position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``module``'s input (I,) and output (D,) at ``position`` of item 0, in float32."""
    x, y = layer_io(model, module, batch)  # (1, T, I), (1, T, D)
    return x[0, position].float(), y[0, position].float()


def optimise_delta(
    model: LVLM,
    module: nn.Module,
    batch: Batch,
    position: int,
    base: torch.Tensor,
    cfg: DeltaSettings,
    method: str,
) -> tuple[torch.Tensor, list[float]]:
    """``delta`` (D,) added to ``module``'s output ``base`` at ``position`` that minimises the edit's NLL.

    Adam on the NLL plus ROME's weight decay ``‖delta‖² / ‖base‖²``; after each step ``‖delta‖`` is
    clamped to ``clamp_norm_factor · ‖base‖`` (0: no clamp). A non-finite loss is ``EditCollapsed``.
    """
    delta = torch.zeros_like(base, requires_grad=True)  # (D,) float32
    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    max_norm = cfg.clamp_norm_factor * float(base.norm())
    losses: list[float] = []
    with trainable_only(model.model, {}), torch.enable_grad(), add_at(module, batch, position, delta):
        for step in range(cfg.v_steps):
            nll = model.loss(batch)  # scalar: mean target NLL of the edit
            value = float(nll.detach())
            if not math.isfinite(value):
                raise EditCollapsed(f"{method}: loss became {value} at step {step}", step)
            losses.append(value)
            decay = cfg.v_weight_decay * delta.norm() ** 2 / base.norm().clamp_min(1e-8) ** 2
            opt.zero_grad(set_to_none=True)
            (nll + decay).backward()
            opt.step()
            if max_norm > 0:
                with torch.no_grad():
                    delta.mul_(min(1.0, max_norm / max(float(delta.norm()), 1e-12)))
    return delta.detach(), losses


@contextmanager
def add_at(module: nn.Module, batch: Batch, position: int, delta: torch.Tensor) -> Iterator[None]:
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


# --- statistics texts ---------------------------------------------------------------------


def case_samples(cases: Sequence[EditCase]) -> list[Sample]:
    """Prompt+target (+ image) of every train case's edit and probes, each once, in order."""
    out: dict[tuple[str, str, Any], Sample] = {}
    for case in cases:
        for item in (case.edit, *case.probes):
            out.setdefault(
                (item.prompt, item.target, item.image), Sample(item.prompt, item.target, item.image)
            )
    return list(out.values())


def read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def text_batches(model: LVLM, lines: list[str], size: int) -> Iterator[dict[str, torch.Tensor]]:
    for start in range(0, len(lines), size):
        chunk = lines[start : start + size]
        enc = model.family.preprocess(model.processor, chunk, [None] * len(chunk), "right", True)
        yield {k: v.to(model.device) for k, v in enc.inputs.items()}


def sample_batches(model: LVLM, samples: list[Sample], size: int) -> Iterator[dict[str, torch.Tensor]]:
    for start in range(0, len(samples), size):
        yield model.encode(samples[start : start + size]).inputs


def stats_key(model: LVLM, site: str, texts: list[str]) -> str:
    """Hash of the model's weights, the site and the texts: what the statistics are a function of.

    The weights, never the folder they came from: a model rebuilt in place (the bundled world model
    is, by ``mmke build model``) keeps its path, and a path key served it the statistics of its old
    weights, so ROME and MEMIT silently edited with another model's ``C``.
    """
    head = {"v": STATS_VERSION, "weights": model_fingerprint(model), "site": site, "dtype": str(model.dtype)}
    digest = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
    digest.update("\n".join(texts).encode())
    return digest.hexdigest()[:32]


def load_stats(path: Path, device: torch.device | str) -> torch.Tensor | None:
    """The cached ``C`` at ``path``, or None when there is none or it is unusable (then recomputed).

    A cache file is data, never code: ``weights_only=True`` refuses a pickle of anything but
    tensors (torch < 2.6 would run it). A refused, truncated or unreadable file, or one that is
    not a finite square float64 matrix, is logged and recomputed over, never a raw traceback.
    """
    if not path.is_file():
        return None
    try:
        cov = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'unreadable'}"
    else:
        if _is_second_moment(cov):
            return cov
        why = "not a finite square float64 matrix"
    log.warning("ignoring the key statistics cache file %s (%s): recomputing it", path, why)
    return None


def _is_second_moment(cov: object) -> bool:
    return (
        isinstance(cov, torch.Tensor)
        and cov.dtype == torch.float64
        and cov.dim() == 2
        and cov.shape[0] == cov.shape[1]
        and bool(torch.isfinite(cov).all())
    )


KV = TypeVar("KV", bound=KeyValueConfig)


class KeyValueEditor(Editor[KV], Generic[KV]):
    """What ROME and MEMIT share as editors: key statistics of the weights ``sites`` names, gathered
    in ``train`` (unless ``stats_texts`` gives them a corpus) and cached.
    """

    def __init__(self, config: KV | dict[str, Any] | None = None) -> None:
        super().__init__(config)
        self._stats = KeyStatistics(self.name, self.config.stats_texts, self.config.stats_batch_size)

    def sites(self, model: LVLM) -> list[str]:
        """The MLP output projections this editor rewrites in ``model``."""
        raise NotImplementedError

    @property
    def needs_train_cases(self) -> bool:
        return self.config.stats_texts is None

    def train(self, model: LVLM, train_cases: Sequence[EditCase]) -> None:
        """Compute (or load from the cache) the second moment of every edited layer's inputs."""
        self._stats.train(model, self.sites(model), train_cases)
