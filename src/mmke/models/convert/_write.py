"""Writing a planned conversion: safetensors shards, config, processor and a record of what was done.

Nothing is written until the whole plan has been checked; the folder then loads with
``from_pretrained`` (and ``LVLM.load``) like any transformers model.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmke.io import atomic_path, write_atomic
from mmke.models.convert._mapping import ConversionError, Plan, Source, plan

_SHARD_SIZE = "5GB"


@dataclass(frozen=True)
class Target:
    """What a conversion builds: the transformers class, its config, its processor, the weights' dtype."""

    model_class: type[nn.Module]
    config: Any
    processor: Any
    dtype: torch.dtype


@dataclass(frozen=True)
class Conversion:
    """A kind's reading of SRC: its checkpoints with their tables, the target they fill, and the
    decisions worth recording (tokens added, the prompt format the chat template carries)."""

    kind: str
    sources: tuple[Source, ...]
    target: Target
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConversionReport:
    """What ``convert`` wrote (also saved as ``conversion.json`` in the output folder)."""

    kind: str
    src: Path
    out: Path
    model_class: str
    tensors: int
    dtype: str
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> source tensors dropped for it
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        n_dropped = sum(self.dropped.values())
        return (
            f"wrote {self.out}: {self.model_class} ({self.tensors} tensors, {self.dtype}) from {self.kind} "
            f"checkpoint {self.src}; {n_dropped} source tensor(s) dropped as the original code never "
            f"loads them (reasons in {self.out / 'conversion.json'})"
        )


def target_shapes(target: Target) -> dict[str, torch.Size]:
    """Every tensor the target model loads, by name and shape, from a model built on the meta device.

    Tied weights appear once (under the name ``named_parameters`` keeps); non-persistent buffers
    (rotary frequencies, position ids) are rebuilt by transformers and not written.
    """
    with torch.device("meta"):
        model = target.model_class(target.config)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    return {k: v.shape for k, v in model.state_dict().items() if k in params or k in buffers}


def convert(conversion: Conversion, src: Path, out: Path) -> ConversionReport:
    """Check the whole conversion, then write ``out`` (which must be new or empty)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out} is not an empty folder: choose a new one for the converted model")
    shapes = target_shapes(conversion.target)
    planned = plan(conversion.sources, shapes)
    out.mkdir(parents=True, exist_ok=True)
    _write_weights(planned, shapes, conversion.target.dtype, out)
    config = conversion.target.config
    config.architectures = [conversion.target.model_class.__name__]
    config.dtype = conversion.target.dtype
    config.save_pretrained(out)
    conversion.target.processor.save_pretrained(out)
    report = ConversionReport(
        kind=conversion.kind,
        src=src,
        out=out,
        model_class=conversion.target.model_class.__name__,
        tensors=len(shapes),
        dtype=str(conversion.target.dtype).removeprefix("torch."),
        dropped=dict(Counter(reason for _, _, reason in planned.dropped)),
        notes=conversion.notes,
    )
    _write_record(report, planned, out)
    return report


def _write_weights(planned: Plan, shapes: dict[str, torch.Size], dtype: torch.dtype, out: Path) -> None:
    """Safetensors shards (with an index when there is more than one), one shard in memory at a time."""
    from huggingface_hub import split_state_dict_into_shards_factory
    from safetensors.torch import save_file

    metas = {k: torch.empty(s, dtype=dtype, device="meta") for k, s in shapes.items()}
    split = split_state_dict_into_shards_factory(
        metas,
        get_storage_size=lambda t: t.numel() * t.element_size(),
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=_SHARD_SIZE,
    )
    for filename, names in split.filename_to_tensors.items():
        # a copy per tensor: the sources are memory-mapped and may share storage (tied weights)
        tensors = {
            n: planned.assignments[n].tensor(shapes[n]).to(dtype=dtype, copy=True).contiguous() for n in names
        }
        with atomic_path(out / filename) as tmp:
            save_file(tensors, tmp, metadata={"format": "pt"})
    if split.is_sharded:
        total = sum(t.numel() * t.element_size() for t in metas.values())
        index = {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename}
        write_atomic(out / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")


def _write_record(report: ConversionReport, planned: Plan, out: Path) -> None:
    """``conversion.json``: the kind, the source files, every dropped key with its reason, the notes."""
    record = {
        "kind": report.kind,
        "source": str(report.src),
        "model_class": report.model_class,
        "dtype": report.dtype,
        "tensors": report.tensors,
        "from_files": sorted({a.source.checkpoint.name for a in planned.assignments.values()}),
        "dropped": [{"file": f, "key": k, "reason": r} for f, k, r in planned.dropped],
        "notes": list(report.notes),
    }
    write_atomic(out / "conversion.json", json.dumps(record, indent=2) + "\n")
