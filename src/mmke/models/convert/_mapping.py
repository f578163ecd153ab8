"""The one mechanism every conversion uses: key tables applied to checkpoints, checked against the target.

A table is data: ``Rule`` entries turn source keys into target keys (both written as templates
with ``{field}`` holes), ``Drop`` entries name source keys the original code never loads and
say why. ``plan`` applies the tables of all source checkpoints before anything is written and
refuses, in one line naming the file and the key, any source key no entry covers, any target
weight nothing fills, and any tensor whose shape disagrees with the target model built from
its config. Shapes are checked on meta tensors, so nothing is read from disk to plan.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from mmke.errors import MmkeError


class ConversionError(MmkeError):
    """An original checkpoint cannot be converted as it is; the message names the file and the key."""


#: Joins the source tensors of one rule into the target tensor of the given shape.
Join = Callable[[Sequence[torch.Tensor], torch.Size], torch.Tensor]


def take(parts: Sequence[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """The one source tensor, unchanged."""
    return parts[0]


def grow_rows(parts: Sequence[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """A vocabulary matrix grown to ``shape[0]`` rows for tokens the conversion adds (``<image>``).

    New rows are the mean of the existing ones: deterministic, and (for an output head) a logit
    that is never the argmax by construction. transformers' LLaVA conversion samples them around
    that mean instead; either way the image token's input row is never read (image features
    replace it).
    """
    (matrix,) = parts  # (V, H)
    extra = shape[0] - matrix.shape[0]
    if extra <= 0:
        return matrix
    mean = matrix.float().mean(dim=0, keepdim=True).to(matrix.dtype)  # (1, H)
    return torch.cat([matrix, mean.expand(extra, -1)], dim=0)  # (V + extra, H)


class Checkpoint(Protocol):
    """Tensors of one original file (or one sharded set), read lazily."""

    name: str

    def names(self) -> list[str]: ...
    def shape(self, key: str) -> torch.Size: ...
    def tensor(self, key: str) -> torch.Tensor: ...
    def where(self, key: str) -> str: ...


@dataclass(frozen=True)
class Rule:
    """Source keys matching ``sources`` become the target key ``target``, joined by ``join``.

    Templates hold ``{name}`` (one dotted segment, e.g. a layer index) or ``{name:path}`` (any
    rest of the key, dots included); every source template of a rule has the same fields.
    """

    sources: tuple[str, ...]
    target: str
    join: Join = take


@dataclass(frozen=True)
class Drop:
    """Source keys the original code never uses, and why (kept in the conversion record).

    ``when`` narrows the drop by the key's fields (e.g. blocks past the depth the original builds).
    """

    source: str
    reason: str
    when: Callable[[Mapping[str, str]], bool] | None = None


Entry = Rule | Drop


def rename(source: str, target: str, join: Join = take) -> Rule:
    """A rule with a single source key."""
    return Rule((source,), target, join)


@dataclass(frozen=True)
class Source:
    """One original checkpoint and the table that maps its keys (first matching entry wins)."""

    checkpoint: Checkpoint
    table: tuple[Entry, ...]


@dataclass(frozen=True)
class Assignment:
    """How one target tensor is made: these keys of this checkpoint, joined."""

    target: str
    source: Source
    keys: tuple[str, ...]
    join: Join

    def tensor(self, shape: torch.Size) -> torch.Tensor:
        parts = [self.source.checkpoint.tensor(k) for k in self.keys]
        return self.join(parts, shape)


@dataclass
class Plan:
    """Every target tensor's assignment, and every dropped source key with its reason."""

    assignments: dict[str, Assignment] = field(default_factory=dict)
    dropped: list[tuple[str, str, str]] = field(default_factory=list)  # (file, key, reason)


# --- templates ----------------------------------------------------------------------------

_FIELD = re.compile(r"\{(\w+)(:path)?\}")


def _regex(template: str) -> re.Pattern[str]:
    """``layers.{i}.{rest:path}`` -> a full-match pattern with named groups."""
    out, end = [], 0
    for m in _FIELD.finditer(template):
        out.append(re.escape(template[end : m.start()]))
        out.append(f"(?P<{m.group(1)}>{'.+' if m.group(2) else '[^.]+'})")
        end = m.end()
    out.append(re.escape(template[end:]))
    return re.compile("".join(out))


def _fill(template: str, fields: Mapping[str, str]) -> str:
    return _FIELD.sub(lambda m: fields[m.group(1)], template)


class _Matcher:
    """The compiled templates of one plan (compiled once per plan, not kept between plans)."""

    def __init__(self) -> None:
        self._compiled: dict[str, re.Pattern[str]] = {}

    def match(self, template: str, key: str) -> dict[str, str] | None:
        pattern = self._compiled.setdefault(template, _regex(template))
        m = pattern.fullmatch(key)
        return m.groupdict() if m else None


# --- planning -----------------------------------------------------------------------------


def plan(sources: Sequence[Source], target: Mapping[str, torch.Size]) -> Plan:
    """Map every key of every source onto ``target`` (target key -> shape), or refuse in one line.

    Sources are applied in order; a later source may replace a target tensor an earlier one gave
    (the order the original code loads its files in), never one from the same source.
    """
    matcher, result = _Matcher(), Plan()
    for source in sources:
        for tgt, (rule, found) in _collect(source, matcher, result).items():
            result.assignments[tgt] = _assign(source, tgt, rule, found, target)
    _check_complete(sources, target, result, matcher)
    return result


def _collect(source: Source, matcher: _Matcher, result: Plan) -> dict[str, tuple[Rule, dict[int, str]]]:
    """Target key -> (its rule, {part index: source key}) for one source; drops go to ``result``."""
    ckpt = source.checkpoint
    parts: dict[str, tuple[Rule, dict[int, str]]] = {}
    for key in ckpt.names():
        entry, index, fields = _entry_for(source.table, key, matcher)
        if entry is None:
            raise ConversionError(
                f"{ckpt.where(key)}: key {key!r} is not mapped (no entry of the conversion table "
                "covers it; is this the right checkpoint for this kind?)"
            )
        if isinstance(entry, Drop):
            result.dropped.append((ckpt.name, key, entry.reason))
            continue
        tgt = _fill(entry.target, fields)
        rule, slot = parts.setdefault(tgt, (entry, {}))
        if rule is not entry or index in slot:
            other = next(iter(slot.values()))
            raise ConversionError(f"{ckpt.where(key)}: keys {other!r} and {key!r} both map to {tgt!r}")
        slot[index] = key
    return parts


def _entry_for(
    table: Sequence[Entry], key: str, matcher: _Matcher
) -> tuple[Entry | None, int, dict[str, str]]:
    for entry in table:
        templates = (entry.source,) if isinstance(entry, Drop) else entry.sources
        for index, template in enumerate(templates):
            fields = matcher.match(template, key)
            if fields is None:
                continue
            if isinstance(entry, Drop) and entry.when is not None and not entry.when(fields):
                continue
            return entry, index, fields
    return None, 0, {}


def _assign(
    source: Source, tgt: str, rule: Rule, found: dict[int, str], target: Mapping[str, torch.Size]
) -> Assignment:
    """One target tensor's assignment, its parts complete and its shape checked."""
    ckpt = source.checkpoint
    first = found[min(found)]
    if tgt not in target:
        raise ConversionError(
            f"{ckpt.where(first)}: key {first!r} maps to {tgt!r}, which the target model built from "
            "its config does not have (more layers or parts in the file than in the config?)"
        )
    keys = _complete_parts(ckpt, rule, found)
    assignment = Assignment(tgt, source, keys, rule.join)
    got = _planned_shape(ckpt, assignment, target[tgt])
    if got != target[tgt]:
        shapes = ", ".join(f"{k} {tuple(ckpt.shape(k))}" for k in keys)
        raise ConversionError(
            f"{ckpt.where(first)}: {shapes} gives shape {tuple(got)} for {tgt!r}, "
            f"but the target model built from its config needs {tuple(target[tgt])}"
        )
    return assignment


def _complete_parts(ckpt: Checkpoint, rule: Rule, found: dict[int, str]) -> tuple[str, ...]:
    if len(found) == len(rule.sources):
        return tuple(found[i] for i in range(len(rule.sources)))
    have = found[min(found)]
    fields = _Matcher().match(rule.sources[min(found)], have) or {}
    missing = [_fill(t, fields) for i, t in enumerate(rule.sources) if i not in found]
    raise ConversionError(f"{ckpt.where(have)}: key {missing[0]!r} is missing (it goes with {have!r})")


def _planned_shape(ckpt: Checkpoint, assignment: Assignment, shape: torch.Size) -> torch.Size:
    """The joined tensor's shape, computed on meta tensors (no data is read)."""
    metas = [torch.empty(ckpt.shape(k), device="meta") for k in assignment.keys]
    try:
        return assignment.join(metas, shape).shape
    except RuntimeError as e:  # parts that cannot be joined, e.g. concatenated biases of other widths
        shapes = ", ".join(f"{k} {tuple(m.shape)}" for k, m in zip(assignment.keys, metas, strict=True))
        raise ConversionError(
            f"{ckpt.where(assignment.keys[0])}: cannot build {assignment.target!r} from {shapes} "
            f"({str(e).splitlines()[0]})"
        ) from None


def _check_complete(
    sources: Sequence[Source], target: Mapping[str, torch.Size], result: Plan, matcher: _Matcher
) -> None:
    """Every target tensor is filled; a missing one names the file and key it should come from."""
    missing = [k for k in target if k not in result.assignments]
    if not missing:
        return
    tgt = missing[0]
    more = f" (and {len(missing) - 1} more target weights)" if len(missing) > 1 else ""
    for source in sources:
        for entry in source.table:
            if isinstance(entry, Rule) and (fields := matcher.match(entry.target, tgt)) is not None:
                key = _fill(entry.sources[0], fields)
                raise ConversionError(f"{source.checkpoint.name}: key {key!r} is missing (for {tgt!r}){more}")
    raise ConversionError(f"no conversion table entry fills {tgt!r}{more}")
