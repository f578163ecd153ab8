"""Loading a model directory offline: check it, pick its family, build processor and model.

Every failure becomes one ``ModelLoadError`` line that names the directory and the problem.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmke.errors import ModelLoadError, UnknownNameError
from mmke.models.families import Family
from mmke.registry import model_families

log = logging.getLogger(__name__)

#: Files of which at least one must exist for a tokenizer or processor to load.
_TEXT_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "processor_config.json",
)


def family_named(name: str | Family) -> Family:
    """A family instance from its registered name (or the instance itself)."""
    if isinstance(name, Family):
        return name
    return model_families.get(name)()


def bundled_or_path(path: str | Path) -> Path:
    """A bundled model's package-data directory when ``path`` names one (and no such path exists)."""
    from mmke.models.bundled import resolve_bundled

    bundled = resolve_bundled(str(path))
    if bundled is None:
        return Path(path)
    if not (bundled / "config.json").is_file():
        raise ModelLoadError(f"bundled model {str(path)!r} is not built yet: run `mmke build model`")
    return bundled


def read_config(path: Path) -> Any:
    from transformers import AutoConfig

    if not path.is_dir():
        raise ModelLoadError(f"{path}: no such model directory")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: not a model directory (config.json is missing)")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise ModelLoadError(f"{path}: unreadable config.json ({_first_line(e)})") from None


def infer_family(config: Any, path: Path) -> Family:
    """The family that drives this config: by architecture first, then by model_type."""
    families = [model_families.get(n)() for n in model_families.names()]
    archs = tuple(getattr(config, "architectures", None) or ())
    for fam in families:
        if any(a in fam.architectures for a in archs):
            return fam
    model_type = getattr(config, "model_type", "")
    for fam in families:
        if model_type in fam.model_types:
            return fam
    known = ", ".join(sorted(model_families.names()))
    raise ModelLoadError(
        f"{path}: unsupported architecture {', '.join(archs) or '?'} (model_type {model_type!r}); "
        f"pass family= one of: {known}"
    )


def resolve_family(family: str | Family | None, config: Any, path: Path) -> Family:
    if family is None:
        return infer_family(config, path)
    try:
        return family_named(family)
    except UnknownNameError as e:
        raise ModelLoadError(f"{path}: {e}") from None


def load_processor(family: Family, path: Path) -> Any:
    if not any((path / f).is_file() for f in _TEXT_FILES):
        raise ModelLoadError(
            f"{path}: no tokenizer or processor files ({', '.join(_TEXT_FILES)}); "
            "save them next to the weights with processor.save_pretrained(dir)"
        )
    try:
        processor = family.load_processor(path)
    except (ImportError, ValueError, TypeError, OSError, KeyError) as e:
        raise ModelLoadError(f"{path}: cannot load the processor/tokenizer ({_first_line(e)})") from None
    if family.multimodal and not hasattr(processor, "image_processor"):
        raise ModelLoadError(
            f"{path}: found a tokenizer but no image processor for {family.name} "
            "(preprocessor_config.json / processor_config.json missing?)"
        )
    return processor


def load_model(family: Family, config: Any, path: Path, dtype: str | torch.dtype, device: str) -> nn.Module:
    cls = family.model_class(config)
    # straight onto an accelerator (no CPU copy first); plain CPU loading needs no accelerate
    placement = {} if device == "cpu" else {"device_map": device}
    try:
        model = cls.from_pretrained(path, dtype=_dtype(dtype), local_files_only=True, **placement)
    except (ImportError, ValueError, TypeError, OSError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"{path}: cannot load {cls.__name__} weights ({_first_line(e)})") from None
    log.info("loaded %s (%s, family %s) on %s", path, cls.__name__, family.name, device)
    return model.eval()


def _dtype(dtype: str | torch.dtype) -> str | torch.dtype:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise ModelLoadError(f"unknown dtype {dtype!r} (use 'auto', 'float32', 'bfloat16' or 'float16')")
    return resolved


def _first_line(e: BaseException) -> str:
    """The gist of a library error: its first line, or of a long line its first sentence (HF adds advice)."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    line = text.splitlines()[0]
    return line.split(". ", 1)[0] if len(line) > 160 else line
