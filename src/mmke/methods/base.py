"""What every editing method shares: the ``Editor`` contract, the ``Edited`` handle and exact restore.

An editor's ``apply(model, case)`` returns an ``Edited`` handle; scoring goes through the
handle and ``restore()`` undoes the edit exactly. Three kinds of handle cover the methods:
``ParamEdited`` (weights changed in place, restored from a snapshot of only those weights),
``PromptEdited`` (inference-time prompt rewriting, nothing to restore) and ``ModuleEdited``
(a submodule swapped for a wrapper and swapped back: SERAC / GRACE / WISE style).
"""

from __future__ import annotations

import difflib
import math
import os
import types
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import fields, replace
from typing import Any, ClassVar, Generic, Self, TypeVar, Union, get_args, get_origin, get_type_hints

import torch
from torch import nn
from transformers.utils import ModelOutput

from mmke.errors import ConfigError, MmkeError
from mmke.errors import EditorNotReadyError as EditorNotReadyError  # part of the editors' API
from mmke.models.base import LVLM, Item
from mmke.models.batch import Batch
from mmke.models.layout import LayoutError
from mmke.models.scoring import ItemScore, ScoredBatch
from mmke.types import EditCase, Sample

C = TypeVar("C")


class BatchUnsupported(ConfigError):
    """The method cannot write several edits in one update (the batch protocol asked it to)."""


class EditCollapsed(MmkeError):
    """An edit diverged (non-finite loss or weights); what it touched is already restored.

    ``step`` is the optimisation step at which it was seen, for the record's ``collapsed_at``.
    """

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


# --- the handle ---------------------------------------------------------------------------


class Edited(ABC):
    """A live edit of one model: score and generate through it, then ``restore()`` (exact, idempotent).

    Use as a context manager so the edit is undone even when scoring raises. ``details`` holds
    what the method reports about this edit (e.g. FT's loss per step).
    """

    def __init__(self, model: LVLM, details: Mapping[str, Any] | None = None) -> None:
        self.model = model
        self.details: dict[str, Any] = dict(details or {})
        self._restored = False

    @property
    def edited_params(self) -> int:
        """How many parameters the edit changed or added (0 for prompt-only methods)."""
        return 0

    @property
    def restored(self) -> bool:
        return self._restored

    def view(self, items: Sequence[Item]) -> Sequence[Item]:
        """The items as the edited model is asked them: unchanged unless the method rewrites prompts."""
        return items

    def score(self, items: Sequence[Item], *, batch_size: int = 32, topk: int = 10) -> ScoredBatch:
        """``LVLM.score`` through the edit."""
        self._check_live()
        return self.model.score(self.view(items), batch_size=batch_size, topk=topk)

    def generate(self, items: Sequence[Item], *, max_new_tokens: int = 16, batch_size: int = 32) -> list[str]:
        self._check_live()
        return self.model.generate(self.view(items), max_new_tokens=max_new_tokens, batch_size=batch_size)

    def restore(self) -> None:
        """Undo the edit; calling it again does nothing."""
        if not self._restored:
            self._release()
            self._restored = True

    @abstractmethod
    def _release(self) -> None:
        """Put the model back as it was before this edit (called once)."""

    def _check_live(self) -> None:
        # after restore the model is the unedited one: scoring it here would mislabel results
        if self._restored:
            raise RuntimeError(f"{type(self).__name__}: this edit was already restored")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


class ParamEdited(Edited):
    """Weights changed in place; ``snapshot`` holds the pre-edit values of exactly those weights."""

    def __init__(
        self, model: LVLM, snapshot: Mapping[str, torch.Tensor], details: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(model, details)
        self.snapshot = dict(snapshot)

    @property
    def edited_params(self) -> int:
        return sum(t.numel() for t in self.snapshot.values())

    def _release(self) -> None:
        restore_params(self.model.model, self.snapshot)


class PromptEdited(Edited):
    """Inference-time editing: every item's prompt is rewritten (image kept); the model is untouched."""

    def __init__(
        self, model: LVLM, rewrite: Callable[[str], str], details: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(model, details)
        self.rewrite = rewrite

    def view(self, items: Sequence[Item]) -> list[Sample]:
        return [Sample(self.rewrite(it.prompt), it.target, it.image) for it in items]

    def _release(self) -> None:
        pass  # nothing was changed; dropping the handle releases the rewrite


class RoutedEdited(Edited):
    """An edit that answers each item by a route of its own (SERAC's counterfactual model, LiveEdit's
    expert mixtures): ``score`` and ``generate`` both go through ``_split``."""

    def score(self, items: Sequence[Item], *, batch_size: int = 32, topk: int = 10) -> ScoredBatch:
        def run(chunk: list[Item]) -> list[ItemScore]:
            return list(self.model.score(chunk, batch_size=batch_size, topk=topk))

        return ScoredBatch(tuple(self._split(items, run)))

    def generate(self, items: Sequence[Item], *, max_new_tokens: int = 16, batch_size: int = 32) -> list[str]:
        def run(chunk: list[Item]) -> list[str]:
            return self.model.generate(chunk, max_new_tokens=max_new_tokens, batch_size=batch_size)

        return self._split(items, run)

    @abstractmethod
    def _split(self, items: Sequence[Item], run: Callable[[list[Item]], Sequence[Any]]) -> list[Any]:
        """``run`` (scoring or generating) on every item, each on the model as routed for it, in order."""


class ModuleEdited(Edited):
    """A submodule swapped for ``replacement`` (a wrapper holding the edit); restore swaps it back."""

    def __init__(
        self,
        model: LVLM,
        site: str,
        replacement: nn.Module,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(model, details)
        self.site = site
        self.replacement = replacement
        self.original = swap_module(model.model, site, replacement)

    @property
    def edited_params(self) -> int:
        # only what the wrapper adds: the original it may hold inside is not an edit
        kept = {id(p) for p in self.original.parameters()}
        return sum(p.numel() for p in self.replacement.parameters() if id(p) not in kept)

    def _release(self) -> None:
        swap_module(self.model.model, self.site, self.original)


# --- shared mechanisms --------------------------------------------------------------------


def snapshot(params: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Detached copies of the parameters a method will touch (and only those), keyed by full name."""
    return {name: p.detach().clone() for name, p in params.items()}


def restore_params(module: nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    """Copy a snapshot back in place (bit-identical: same dtype, no arithmetic) and drop stale grads."""
    with torch.no_grad():
        for name, value in saved.items():
            param = module.get_parameter(name)
            param.copy_(value)
            param.grad = None


@contextmanager
def trainable_only(module: nn.Module, params: Mapping[str, nn.Parameter]) -> Iterator[None]:
    """While active only ``params`` require grad and the module is in eval mode; flags and mode come back.

    Eval mode keeps dropout off so an edit is deterministic (the anchors' LVLMs use no dropout).
    """
    flags = {name: p.requires_grad for name, p in module.named_parameters()}
    was_training = module.training
    chosen = {id(p) for p in params.values()}
    try:
        for p in module.parameters():
            p.requires_grad_(id(p) in chosen)
        module.eval()
        yield
    finally:
        for name, p in module.named_parameters():
            p.requires_grad_(flags[name])
        module.train(was_training)


class _Replay(nn.Module):
    """A frozen stage run once: the first call computes (without grad), later calls return copies of that."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.out: Any = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # a model may read its stage's attributes (config, dtype, attention_type)
            return getattr(super().__getattr__("inner"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.out is None:
            with torch.no_grad():
                self.out = self.inner(*args, **kwargs)
        return _fresh(self.out)


def _fresh(out: Any) -> Any:
    """A copy a consumer may change in place (Qwen2-VL re-splits its vision output's fields)."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if type(out) in (tuple, list):
        return type(out)(_fresh(x) for x in out)
    if isinstance(out, ModelOutput):
        return type(out)(**{k: _fresh(v) for k, v in out.items()})
    return out


def _forward_stages(model: LVLM) -> list[str]:
    """The model's stages in forward order: vision tower, Q-Former, projector, embeddings, decoder layers."""
    layout, stages = model.layout, []
    if layout.has_vision:
        for role in (layout.vision_tower, layout.qformer, layout.projector):
            with suppress(LayoutError):
                stages.append(role())
    return [*stages, layout.embeddings(), *layout.decoder_layers()]


@contextmanager
def frozen_prefix_replayed(model: LVLM, params: Mapping[str, nn.Parameter]) -> Iterator[None]:
    """While active, the stages that run before any of ``params`` compute once and replay their output.

    An edit that optimises ``params`` for many steps on one fixed batch (FT, LoRA) recomputes, at
    every step, a vision tower and decoder layers whose weights and inputs never change; the
    anchors pay that each step. Here the first step's outputs of those stages are kept and handed
    back, so later steps run only from the first edited stage on: the same numbers (the same
    operations on the same inputs), a fraction of the compute when the edit sits in the last layers.
    Only valid while every forward sees the same batch.
    """
    chosen = {id(p) for p in params.values()}
    replayed: list[tuple[str, nn.Module]] = []
    embeddings = model.layout.embeddings()
    try:
        for stage in _forward_stages(model):
            module = model.layout.module(stage)
            if any(id(p) in chosen for p in module.parameters()):
                break
            inside = any(stage.startswith(f"{done}.") for done, _ in replayed)  # e.g. Qwen2-VL's merger
            if stage != embeddings and not inside:  # embeddings: cheap, and also read outside a forward
                replayed.append((stage, swap_module(model.model, stage, _Replay(module))))
        yield
    finally:
        for stage, original in reversed(replayed):
            swap_module(model.model, stage, original)


def swap_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``name`` inside ``root`` and return the module that was there."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = parent.get_submodule(child)
    setattr(parent, child, new)  # also right for ModuleList entries ("layers.3")
    return old


class _Stop(Exception):
    """Raised by a hook that has what it needs: the rest of the forward is not run."""


def layer_output(model: LVLM, module: nn.Module, batch: Batch) -> torch.Tensor:
    """The output (B, T, D) of decoder layer ``module`` (the residual stream) per token of ``batch``,
    from a no-grad forward that stops right after it (nothing later changes it)."""
    seen: dict[str, torch.Tensor] = {}

    def grab(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        seen["h"] = (out[0] if isinstance(out, tuple) else out).detach()  # older layers return tuples
        raise _Stop

    handle = module.register_forward_hook(grab)
    try:
        with torch.no_grad():
            model.family.forward(model.model, batch.inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    hidden, shape = seen["h"], tuple(batch.labels.shape)  # (B, T)
    if tuple(hidden.shape[:2]) != shape:
        raise RuntimeError(f"layer output {tuple(hidden.shape)} does not line up with tokens {shape}")
    return hidden


def layer_io(model: LVLM, module: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``module``'s input (B, T, I) and output (B, T, D) per token of ``batch``, from one no-grad forward.

    Shared by the methods that read a layer's keys and values (GRACE, ROME). Some layers see the
    tokens flattened (OPT's fc2: (B*T, I)); anything that does not line up with the tokens is an error.
    """
    seen: dict[str, torch.Tensor] = {}

    def grab(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        seen["x"], seen["y"] = args[0].detach(), out.detach()

    handle = module.register_forward_hook(grab)
    try:
        with torch.no_grad():
            model.family.forward(model.model, batch.inputs)
    finally:
        handle.remove()
    shape = tuple(batch.labels.shape)  # (B, T)
    x, y = seen["x"], seen["y"]
    tokens = shape[0] * shape[1]
    if x.shape[:-1].numel() != tokens or y.shape[:-1].numel() != tokens:
        raise RuntimeError(f"layer input {tuple(x.shape)} does not line up with tokens {shape}")
    return x.reshape(*shape, -1), y.reshape(*shape, -1)  # (B, T, I), (B, T, D)


def finite_loss(value: float, step: int, method: str) -> float:
    """``value``, or ``EditCollapsed`` when an edit's loss became NaN or infinite at ``step``."""
    if not math.isfinite(value):
        raise EditCollapsed(f"{method}: loss became {value} at step {step}", step)
    return value


W = TypeVar("W", bound=nn.Module)


def wrapper_at(model: LVLM, site: str, wrap: type[W]) -> W:
    """The ``wrap`` wrapper already at ``site`` (lifelong editing: later edits join it), or a new
    ``wrap(module)`` swapped in there."""
    module = model.layout.module(site)
    if isinstance(module, wrap):
        return module
    wrapper = wrap(module)  # type: ignore[call-arg]
    swap_module(model.model, site, wrapper)
    return wrapper


def check_finite(params: Mapping[str, nn.Parameter], method: str, step: int) -> None:
    """Raise ``EditCollapsed`` when any edited weight became NaN or infinite."""
    for name, p in params.items():
        if not bool(torch.isfinite(p).all()):
            raise EditCollapsed(f"{method}: weight {name} became non-finite at step {step}", step)


# --- editors ------------------------------------------------------------------------------


class Editor(ABC, Generic[C]):
    """An editing method: ``apply(model, case) -> Edited``; trainable ones also ``train``.

    Items' images are opened from the store bound to the model (``LVLM.bind_images``).

    Subclasses set ``name`` and ``defaults`` (an instance of their frozen config dataclass); the
    constructor takes that config, a mapping of overrides, or nothing.
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[Any]
    #: Whether the edit lives in the prompt (IKE): some paper protocols score that path apart.
    in_context: ClassVar[bool] = False
    #: Whether ``apply_many`` writes several cases in ONE update (the batch protocol); a method
    #: that cannot says why in ``batch_refusal`` rather than faking it with a loop of single edits.
    batches: ClassVar[bool] = False
    batch_refusal: ClassVar[str] = "it writes one edit per update"

    def __init__(self, config: C | Mapping[str, Any] | None = None) -> None:
        self.config: C = make_config(self.defaults, config, self.name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    @property
    def needs_train_cases(self) -> bool:
        """Whether ``train`` must see the train split before ``apply`` works."""
        return False

    def train(self, model: LVLM, train_cases: Sequence[EditCase]) -> None:
        """Learn or index what the method needs from the train split; by default there is nothing."""

    @abstractmethod
    def apply(self, model: LVLM, case: EditCase) -> Edited:
        """Write ``case.edit`` into ``model``; the handle scores the edited model and restores it."""

    def apply_many(self, model: LVLM, cases: Sequence[EditCase]) -> Edited:
        """Write all ``cases`` in one update; one handle scores them all and restores everything."""
        if len(cases) == 1:
            return self.apply(model, cases[0])
        raise BatchUnsupported(
            f"{self.name} cannot write {len(cases)} edits in one update: {self.batch_refusal} "
            "(use protocol=sequential or protocol=lifelong, or batch_edits=1)"
        )

    @contextmanager
    def applied(self, model: LVLM, case: EditCase) -> Iterator[Edited]:
        """``apply`` as a context manager: the edit is restored on exit, exceptions included."""
        with self.apply(model, case) as edited:
            yield edited


# --- configs ------------------------------------------------------------------------------


def make_config(defaults: C, overrides: C | Mapping[str, Any] | None, method: str = "") -> C:
    """``defaults`` with ``overrides`` applied; unknown keys and ill-typed values are ``ConfigError``s."""
    if overrides is None:
        return defaults
    if isinstance(overrides, type(defaults)):
        return overrides
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"{method} config must be a mapping, got {type(overrides).__name__}")
    valid = [f.name for f in fields(defaults)]  # type: ignore[arg-type]
    for key in overrides:
        if key not in valid:
            raise ConfigError(_unknown_key(method, key, valid))
    hints = get_type_hints(type(defaults))
    values = {key: _coerce(method, key, hints[key], value) for key, value in overrides.items()}
    return replace(defaults, **values)  # type: ignore[type-var]


def _unknown_key(method: str, key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {method} config key {key!r}{hint} (valid keys: {', '.join(valid) or 'none'})"


def _coerce(method: str, key: str, hint: Any, value: Any) -> Any:
    """``value`` as the field's type: numbers from numeric strings, tuples from lists, None for optionals."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(method, key, inner, value)
    if origin is tuple:
        items = value if isinstance(value, list | tuple) else [value]
        return tuple(_coerce(method, key, args[0], v) for v in items)
    try:
        return _scalar(hint, value)
    except (TypeError, ValueError):
        name = getattr(hint, "__name__", str(hint))
        raise ConfigError(f"{method} config key {key!r} must be {name}, got {value!r}") from None


def _scalar(kind: type, value: Any) -> Any:
    if isinstance(value, bool) and kind is not bool:
        raise TypeError("a bool is not a number")
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise TypeError("not a bool")
        return value
    if kind is int and isinstance(value, float):
        raise TypeError("not an integer")
    if kind is str and not isinstance(value, str | os.PathLike):
        raise TypeError("not a string")
    return kind(value)
