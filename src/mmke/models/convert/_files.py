"""Reading an original release from disk: its weight files (lazily), its JSON and its tokenizer.

Pickle files (``.pth``, ``.bin``: how the originals ship) are read with ``torch.load(weights_only=
True)``, which refuses anything but tensors and plain containers; safetensors are opened, never
read whole. Every path is checked to stay inside SRC before it is opened.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from mmke.errors import ModelLoadError
from mmke.models import _loading
from mmke.models.convert._mapping import ConversionError

#: A folder's weight files, in the order ``from_pretrained`` looks for them.
_FOLDER_WEIGHTS = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


class TensorFiles:
    """The tensors of one checkpoint: a single file or the shards of one folder, read lazily."""

    def __init__(self, name: str, files: list[Path], src: Path) -> None:
        self.name = name  # how messages name it (relative to SRC)
        self._src = src
        self._where: dict[str, Path] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        for file in files:
            for key in self._file_keys(file):
                if key in self._where:
                    raise ConversionError(f"{self._rel(file)}: key {key!r} is also in {self.where(key)}")
                self._where[key] = file

    def names(self) -> list[str]:
        return list(self._where)

    def where(self, key: str) -> str:
        return self._rel(self._where[key])

    def shape(self, key: str) -> torch.Size:
        file = self._where[key]
        if file in self._pickled:
            return self._pickled[file][key].shape
        with safe_open(file, framework="pt") as f:
            return torch.Size(f.get_slice(key).get_shape())

    def tensor(self, key: str) -> torch.Tensor:
        file = self._where[key]
        if file in self._pickled:
            return self._pickled[file][key]
        with safe_open(file, framework="pt") as f:
            return f.get_tensor(key)

    def _file_keys(self, file: Path) -> list[str]:
        if file.suffix == ".safetensors":
            try:
                with safe_open(file, framework="pt") as f:
                    return list(f.keys())
            except (SafetensorError, OSError) as e:
                raise ConversionError(f"{self._rel(file)}: unreadable safetensors ({_gist(e)})") from None
        self._pickled[file] = _load_pickled(file, self._rel(file))
        return list(self._pickled[file])

    def _rel(self, file: Path) -> str:
        return str(file.relative_to(self._src)) if file.is_relative_to(self._src) else str(file)


def _load_pickled(file: Path, name: str) -> dict[str, torch.Tensor]:
    """A ``.pth``/``.bin`` state dict; LAVIS and MiniGPT-4 wrap theirs as ``{"model": ...}``
    (their loaders read ``checkpoint["model"]``), which is unwrapped the same way."""
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise ConversionError(f"{name}: unreadable checkpoint ({_gist(e)})") from None
        obj = torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except (pickle.UnpicklingError, EOFError, OSError, ValueError) as e:
        raise ConversionError(
            f"{name}: not a plain weights file (torch.load(weights_only=True) refused it: {_gist(e)})"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ConversionError(f"{name}: holds a {type(obj).__name__}, not a state dict")
    bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ConversionError(f"{name}: entry {bad!r} is a {type(obj[bad]).__name__}, not a tensor")
    return obj


def checkpoint_file(src: Path, path: Path) -> TensorFiles:
    """One weight file of SRC."""
    return TensorFiles(str(path.relative_to(src)), [path], src)


def folder_weights(src: Path, folder: Path) -> TensorFiles:
    """The weights of an HF-style folder inside SRC: one file, or the shards its index names."""
    name = str(folder.relative_to(src)) if folder != src else "."
    entry = next((folder / n for n in _FOLDER_WEIGHTS if (folder / n).is_file()), None)
    if entry is None:
        raise ConversionError(f"{src / name}: no weights ({', '.join(_FOLDER_WEIGHTS)} missing)")
    if not entry.name.endswith(".index.json"):
        return TensorFiles(name, [entry], src)
    index = read_json(entry, src)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise ConversionError(f"{entry.relative_to(src)}: no 'weight_map'")
    shards = [inside(folder, str(s), f"{entry.name}'s weight_map") for s in sorted(set(weight_map.values()))]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise ConversionError(
            f"{entry.relative_to(src)}: names shards missing from the folder: {', '.join(missing)}"
        )
    return TensorFiles(name, shards, src)


def has_folder_weights(folder: Path) -> bool:
    return any((folder / n).is_file() for n in _FOLDER_WEIGHTS)


def read_json(path: Path, src: Path) -> dict[str, Any]:
    name = path.relative_to(src) if path.is_relative_to(src) else path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"{name}: missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConversionError(f"{name}: unreadable JSON ({_gist(e)})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{name}: expected a JSON object, found {type(data).__name__}")
    return data


def inside(folder: Path, name: str, where: str) -> Path:
    """``folder / name``, refused when it points outside ``folder``."""
    try:
        return _loading.inside(folder, name, where)
    except ModelLoadError as e:
        raise ConversionError(str(e)) from None


def find_file(src: Path, patterns: tuple[str, ...], what: str) -> Path:
    """The one file of SRC matching any of ``patterns`` (glob), or a line saying what is missing."""
    found = sorted({p for pat in patterns for p in src.glob(pat) if p.is_file()})
    if not found:
        raise ConversionError(f"{src}: missing {' or '.join(patterns)} ({what})")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ConversionError(f"{src}: {names} all look like {what}; keep one")
    return found[0]


def find_folder(src: Path, name: str, what: str) -> Path:
    folder = inside(src, name, "the layout")
    if not folder.is_dir():
        raise ConversionError(f"{src}: missing folder {name}/ ({what})")
    return folder


def load_tokenizer(folder: Path, src: Path) -> Any:
    """The release's own tokenizer (offline), as a fast transformers tokenizer.

    A blank config stands in for the folder's: a LLaVA release's model_type (llava_mistral …) is
    not one transformers knows, and the tokenizer's class is named in tokenizer_config.json.
    """
    from transformers import AutoTokenizer, PreTrainedConfig

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, config=PreTrainedConfig())
    except (OSError, ValueError, TypeError, KeyError, ImportError) as e:
        where = folder.relative_to(src) if folder != src else src
        raise ConversionError(f"{where}: cannot load the tokenizer ({_gist(e)})") from None


def _gist(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
