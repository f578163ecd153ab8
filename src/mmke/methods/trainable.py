"""What the editors with networks of their own (SERAC, MEND, KE) share: meta-training, checkpoints, loading.

A ``TrainableEditor`` subclass says only how to build its networks for a model (``build``) and
what one training step's loss is (``meta_loss``); this module runs the loop. Training is
deterministic and resumable: the cases of step ``s`` are drawn from ``Random(seed, s)``, so a run
resumed from a checkpoint sees exactly the steps it would have seen. Checkpoints and the final
editor are safetensors (the networks' weights, and Adam's moments for resuming) plus a JSON file
with the method, its config, the model's fingerprint and the training log.

Where a trained editor is found, in order: ``editor_path`` in the method's config; the model
directory's ``editors/<method>/`` (how the world model ships its editors); the cache
(``cache_dir()/editors/<fingerprint>/<method>-<config hash>``), where a run that had to train
leaves it so the next run does not train again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmke.cache import cache_dir
from mmke.errors import ConfigError, MmkeError
from mmke.io import atomic_path, write_atomic
from mmke.methods.base import Editor, EditorNotReadyError
from mmke.models.base import LVLM
from mmke.models.families import OWN_FORMAT
from mmke.types import EditCase

log = logging.getLogger(__name__)

#: Bumped when the saved layout changes, so old files are refused with a clear message.
FORMAT_VERSION = 1
WEIGHTS, META, CHECKPOINT, CHECKPOINT_META = (
    "editor.safetensors",
    "editor.json",
    "checkpoint.safetensors",
    "checkpoint.json",
)

#: (step, total steps, loss, stats of the step) after every step.
Progress = Callable[[int, int, float, Mapping[str, float]], None]


class EditorFileError(MmkeError):
    """A saved editor is missing, corrupt, or was trained for another model or method."""


SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainingConfig:
    """Fields every trainable editor's config has (its own dataclass inherits them).

    ``train_steps`` meta-training steps of ``train_batch`` cases each, Adam at ``train_lr`` (held
    constant, or with ``train_schedule="cosine"`` decayed to 0 by the last step) with gradients
    clipped at ``grad_clip``; ``editor_path`` is a directory holding a trained editor.
    """

    train_steps: int = 1000
    train_batch: int = 4
    train_lr: float = 1e-3
    grad_clip: float = 100.0
    train_seed: int = 0
    checkpoint_every: int = 100
    editor_path: str | None = None
    train_schedule: str = "constant"

    def __post_init__(self) -> None:
        if self.train_schedule not in SCHEDULES:
            raise ConfigError(
                f"train_schedule must be one of {', '.join(SCHEDULES)}, got {self.train_schedule!r}"
            )
        if self.train_steps < 1 or self.train_batch < 1 or self.checkpoint_every < 1:
            raise ConfigError("train_steps, train_batch and checkpoint_every must be >= 1")
        if not self.train_lr > 0 or not self.grad_clip > 0:
            raise ConfigError("train_lr and grad_clip must be > 0")


#: Config fields that do not change what a trained editor is (so they do not key the cache).
RUN_ONLY_FIELDS = ("checkpoint_every", "editor_path")
#: Fields added after editors were shipped, with the value those editors were trained with: at that
#: value a field stays out of the identity, so the older editors still load.
ADDED_LATER: dict[str, Any] = {"train_schedule": "constant", "copy_share": 0.0}

C = TypeVar("C", bound=TrainingConfig)


class TrainableEditor(Editor[C], Generic[C]):
    """An editor whose networks are meta-trained on the train split, then used by ``apply``.

    Subclasses implement ``build`` and ``meta_loss``; ``apply`` reads the trained networks with
    ``networks(model)``. ``train`` loads a saved editor when one exists for the model and config,
    and otherwise trains one (and caches it).
    """

    def __init__(self, config: C | Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self._nets: dict[int, nn.Module] = {}  # id(model) -> trained networks

    @property
    def needs_train_cases(self) -> bool:
        return True

    @abstractmethod
    def build(self, model: LVLM) -> nn.Module:
        """Fresh (untrained) networks of this editor, sized for ``model``, on its device."""

    @abstractmethod
    def meta_loss(
        self, model: LVLM, nets: nn.Module, cases: Sequence[EditCase]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """One training step's differentiable loss over ``cases`` and numbers to log."""

    def prepare(self, model: LVLM, train_cases: Sequence[EditCase]) -> None:
        """Anything ``build``/``meta_loss`` need from the train split besides the loop (default none)."""

    # --- the trained networks ---------------------------------------------------------------

    def networks(self, model: LVLM) -> nn.Module:
        """The trained networks for ``model``, loading a saved editor if none is in memory."""
        nets = self._nets.get(id(model))
        if nets is None:
            found = self.find_saved(model)
            if found is None:
                raise EditorNotReadyError(
                    f"{self.name} has no trained editor for this model: run `mmke train-editor "
                    f"--method {self.name}`, set editor_path, or call editor.train(model, cases)"
                )
            nets = self.load(model, found)
        return nets

    def train(self, model: LVLM, train_cases: Sequence[EditCase]) -> None:
        """Use a saved editor for this model and config if there is one; else train and cache one."""
        if id(model) in self._nets:
            return
        found = self.find_saved(model)
        if found is not None:
            self.load(model, found)
            return
        out = self.cache_path(model)
        log.warning("%s: no trained editor for this model; training one (cached in %s)", self.name, out)
        self.fit(model, train_cases, out)

    def fit(
        self,
        model: LVLM,
        train_cases: Sequence[EditCase],
        out: Path,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Meta-train into ``out`` (resuming from its checkpoint), save the editor there, keep it live."""
        if not train_cases:
            raise EditorNotReadyError(f"{self.name} needs train cases to train its editor")
        self.prepare(model, train_cases)
        with torch.random.fork_rng(devices=[]):  # the same seed builds the same networks, globals untouched
            torch.manual_seed(self.config.train_seed)
            nets = self.build(model)
        summary = _Loop(self, model, nets, train_cases, out, progress).run()
        self.save(model, nets, out, summary)
        for name in (CHECKPOINT, CHECKPOINT_META):  # finished: the editor is all there is to keep
            (out / name).unlink(missing_ok=True)
        self._nets[id(model)] = nets
        return summary

    # --- saving and finding -----------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """The config fields that define the trained editor (what a saved one must match).

        Fields in ``ADDED_LATER`` at their old value are left out (editors saved before them used it).
        """
        out = {k: v for k, v in asdict(self.config).items() if k not in RUN_ONLY_FIELDS}
        return {k: v for k, v in out.items() if not (k in ADDED_LATER and ADDED_LATER[k] == v)}

    def trained_identity(self, model: LVLM) -> dict[str, Any]:
        """``identity`` plus, under a paper protocol's inputs, that protocol's prompt format: an
        editor trained on other texts and labels (VLKEB trains MEND on the target alone) is another."""
        out = self.identity()
        if model.prompt_format != OWN_FORMAT:
            out["prompt_format"] = asdict(model.prompt_format)
        return out

    def cache_path(self, model: LVLM) -> Path:
        identity = self.trained_identity(model)
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
        return cache_dir() / "editors" / model_fingerprint(model)[:16] / f"{self.name}-{digest}"

    def find_saved(self, model: LVLM) -> Path | None:
        """A directory with a saved editor for ``model`` and this config, or None."""
        if self.config.editor_path is not None:
            path = Path(self.config.editor_path)
            if not (path / WEIGHTS).is_file():
                raise EditorFileError(f"{self.name}: editor_path {path} holds no {WEIGHTS}")
            return path
        candidates = [self.cache_path(model)]
        if model.source is not None:
            candidates.insert(0, model.source / "editors" / self.name)
        for path in candidates:
            if (path / WEIGHTS).is_file() and self._matches(model, path):
                return path
        return None

    def _matches(self, model: LVLM, path: Path) -> bool:
        meta = _read_meta(path / META)
        return meta.get("fingerprint") == model_fingerprint(model) and meta.get("identity") == _jsonable(
            self.trained_identity(model)
        )

    def save(self, model: LVLM, nets: nn.Module, out: Path, summary: Mapping[str, Any]) -> None:
        meta = {
            "format": FORMAT_VERSION,
            "method": self.name,
            "identity": _jsonable(self.trained_identity(model)),
            "fingerprint": model_fingerprint(model),
            **summary,
        }
        out.mkdir(parents=True, exist_ok=True)
        _save_tensors({k: v.detach() for k, v in nets.state_dict().items()}, out / WEIGHTS)
        _write_json(meta, out / META)

    def load(self, model: LVLM, path: Path) -> nn.Module:
        """Load the saved editor at ``path`` for ``model`` (refusing one made for another model)."""
        meta = _read_meta(path / META)
        if meta.get("method") != self.name:
            raise EditorFileError(f"{path}: holds a {meta.get('method')!r} editor, not {self.name!r}")
        if meta.get("fingerprint") != model_fingerprint(model):
            raise EditorFileError(f"{path}: this {self.name} editor was trained for a different model")
        nets = self.build(model)
        state = _load_tensors(path / WEIGHTS, model.device)
        try:
            nets.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            msg = f"{path / WEIGHTS}: does not fit this {self.name} config ({first})"
            raise EditorFileError(msg) from None
        nets.eval()
        self._nets[id(model)] = nets
        log.info("%s: trained editor from %s", self.name, path)
        return nets


def model_fingerprint(model: LVLM) -> str:
    """A digest of the model's architecture and weights: names, shapes and 256 evenly spaced values
    of every tensor.

    Cheap next to hashing every byte of a 7B model, and exact: no floating-point sums, whose last
    digits change with the thread count. An editor trained on one set of weights is refused for
    another.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.model.state_dict().items():
            flat = p.detach().reshape(-1)
            # float32 positions (the fingerprints of shipped editors depend on them), clamped: above
            # 2^24 elements the last one rounds up past the end (SmolLM2's embedding, 28.3M)
            last = max(0, flat.numel() - 1)
            picks = torch.linspace(0, last, min(256, flat.numel())).long().clamp_(max=last)
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            h.update(flat[picks.to(flat.device)].float().cpu().numpy().tobytes())
    return h.hexdigest()


# --- the loop --------------------------------------------------------------------------------


class _Loop:
    """One resumable meta-training run (Adam, clipped gradients, checkpoint every N steps)."""

    def __init__(
        self,
        editor: TrainableEditor[Any],
        model: LVLM,
        nets: nn.Module,
        cases: Sequence[EditCase],
        out: Path,
        progress: Progress | None,
    ) -> None:
        self.editor, self.model, self.nets, self.cases = editor, model, nets, cases
        self.out, self.progress = out, progress
        self.cfg: TrainingConfig = editor.config
        params = [p for p in nets.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(params, lr=self.cfg.train_lr)
        self.log: list[dict[str, float]] = []

    def run(self) -> dict[str, Any]:
        start = self._resume()
        began = time.perf_counter()
        self.nets.train()
        model_flags = {n: p.requires_grad for n, p in self.model.model.named_parameters()}
        try:
            self.model.model.requires_grad_(False)  # only the editor's networks learn
            self.model.model.eval()
            for step in range(start, self.cfg.train_steps):
                self._step(step)
                if (step + 1) % self.cfg.checkpoint_every == 0 and step + 1 < self.cfg.train_steps:
                    self._checkpoint(step + 1)
        finally:
            for n, p in self.model.model.named_parameters():
                p.requires_grad_(model_flags[n])
        self.nets.eval()
        tail = self.log[-max(1, len(self.log) // 10) :]
        return {
            "steps": self.cfg.train_steps,
            "seconds": round(time.perf_counter() - began, 1),
            "resumed_at": start,
            "final": {k: sum(r[k] for r in tail) / len(tail) for k in tail[0]} if tail else {},
            "log_every_50": self.log[::50],
        }

    def _step(self, step: int) -> None:
        rng = random.Random(f"{self.cfg.train_seed}:{step}")
        batch = [self.cases[rng.randrange(len(self.cases))] for _ in range(self.cfg.train_batch)]
        if self.cfg.train_schedule == "cosine":
            for group in self.opt.param_groups:
                group["lr"] = self.cfg.train_lr * 0.5 * (1 + math.cos(math.pi * step / self.cfg.train_steps))
        loss, stats = self.editor.meta_loss(self.model, self.nets, batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise EditorFileError(f"{self.editor.name}: meta-training loss became {value} at step {step}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.nets.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.log.append({"loss": value, **stats})
        if self.progress is not None:
            self.progress(step + 1, self.cfg.train_steps, value, stats)

    def _checkpoint(self, step: int) -> None:
        tensors = {f"net.{k}": v.detach() for k, v in self.nets.state_dict().items()}
        opt_state = self.opt.state_dict()
        for idx, slot in opt_state["state"].items():
            for key, value in slot.items():
                tensors[f"opt.{idx}.{key}"] = torch.as_tensor(value).detach()
        self.out.mkdir(parents=True, exist_ok=True)
        _save_tensors(tensors, self.out / CHECKPOINT)
        meta = {"step": step, "identity": _jsonable(self.editor.identity()), "log": self.log}
        meta["param_groups"] = opt_state["param_groups"]
        meta["fingerprint"] = model_fingerprint(self.model)
        _write_json(meta, self.out / CHECKPOINT_META)

    def _resume(self) -> int:
        """The step to start at: 0, or the checkpoint's step when ``out`` holds a matching one."""
        path = self.out / CHECKPOINT_META
        if not path.is_file():
            return 0
        meta = _read_meta(path)
        if meta.get("identity") != _jsonable(self.editor.identity()) or meta.get(
            "fingerprint"
        ) != model_fingerprint(self.model):
            raise EditorFileError(f"{path}: checkpoint of a different config or model; use a new --out")
        tensors = _load_tensors(self.out / CHECKPOINT, self.model.device)
        self.nets.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        self.opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.log = list(meta["log"])
        log.info("%s: resuming meta-training at step %d from %s", self.editor.name, meta["step"], path)
        return int(meta["step"])


# --- files -----------------------------------------------------------------------------------


def _save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Atomically, so an interrupted run never leaves a half-written checkpoint."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)


def _load_tensors(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:  # safetensors raises several types for truncated or foreign files
        raise EditorFileError(f"{path}: not a readable safetensors file ({exc})") from None


def _write_json(data: Mapping[str, Any], path: Path) -> None:
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise EditorFileError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EditorFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise EditorFileError(f"{path}: expected a JSON object")
    if "format" in meta and meta["format"] != FORMAT_VERSION:
        raise EditorFileError(f"{path}: editor format {meta['format']}, this mmke reads {FORMAT_VERSION}")
    return meta


def _jsonable(value: Any) -> Any:
    """Tuples as lists, so a config read back from JSON compares equal."""
    return json.loads(json.dumps(value))
