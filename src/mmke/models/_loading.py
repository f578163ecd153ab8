"""Loading a model directory offline: check it, pick its family, build processor and model.

Every failure becomes one ``ModelLoadError`` line that names the directory and the problem.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from mmke.errors import ModelLoadError, UnknownNameError
from mmke.models.families import Family
from mmke.models.families.remote import RemoteCode
from mmke.registry import bundled_models, model_families

log = logging.getLogger(__name__)

#: Files of which at least one must exist for a tokenizer or processor to load.
_TEXT_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "processor_config.json",
)
#: The weight files ``from_pretrained`` reads first (in this order) when the config names none.
_SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
#: Weight files read with pickle (``torch.load``), which can run code when a file is crafted to.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_DEVICES = "use cpu, cuda, cuda:N or mps"
#: A row of transformers' LOAD REPORT table for a tensor whose shape differs (the status may be coloured).
_MISMATCH = re.compile(r"^(\S+)\s+\|\s*(?:\x1b\[[0-9;]*m)?MISMATCH\b", re.MULTILINE)
#: safetensors refuses headers above this size; never read more than it.
_MAX_HEADER = 100_000_000


def family_named(name: str | Family) -> Family:
    """A family instance from its registered name (or the instance itself)."""
    if isinstance(name, Family):
        return name
    return model_families.get(name)()


def resolve_bundled(name: str) -> Path | None:
    """The package-data directory of a bundled model called ``name``, if it is one and no such path exists."""
    if Path(name).exists() or name not in bundled_models:
        return None
    return bundled_models.get(name).path()


def bundled_or_path(path: str | Path) -> Path:
    """A bundled model's package-data directory when ``path`` names one (and no such path exists)."""
    bundled = resolve_bundled(str(path))
    if bundled is None:
        return Path(path)
    if not (bundled / "config.json").is_file():
        raise ModelLoadError(f"bundled model {str(path)!r} is not built yet: run `mmke build model`")
    return bundled


def read_config(path: Path, trust_remote_code: bool = False) -> Any:
    """The folder's config; a folder whose config is its own Python code only with ``trust_remote_code``."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    if not path.is_dir():
        raise ModelLoadError(f"{path}: no such model directory")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: not a model directory (config.json is missing)")
    remote = remote_code(path)
    if remote and not trust_remote_code:  # refused before transformers would ask on stdin
        files = ", ".join(sorted({_module_file(ref) for ref in _refs(remote)}))
        raise ModelLoadError(
            f"{path}: its model is Python code in the folder ({files}, named by config.json's auto_map); "
            "pass trust_remote_code=true to load it, which runs that code with your permissions"
        )
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=bool(remote))
    except RecursionError:
        raise ModelLoadError(f"{path}: unreadable config.json (nested too deeply)") from None
    except StrictDataclassError as e:  # a field of the wrong type, e.g. "text_config": "llama"
        raise ModelLoadError(f"{path}: bad value in config.json ({_first_line(e.__cause__ or e)})") from None
    except (ValueError, KeyError, OSError, ImportError) as e:
        raise ModelLoadError(f"{path}: unreadable config.json ({_first_line(e)})") from None


def remote_code(path: Path) -> dict[str, Any]:
    """config.json's ``auto_map`` when the folder's model is its own Python code: transformers does
    not know its ``model_type`` (where it does, it loads its own code and ignores the map, as
    transformers does); {} otherwise, or when config.json does not parse (reported where it is read).
    Code from another repository (``repo--module.Class``) is refused: mmke loads offline."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return {}
    auto_map = raw.get("auto_map") if isinstance(raw, dict) else None
    if not isinstance(auto_map, dict) or not auto_map or raw.get("model_type") in CONFIG_MAPPING:
        return {}
    for ref in _refs(auto_map):
        if "--" in ref:
            raise ModelLoadError(
                f"{path}: config.json's auto_map takes {ref!r} from another repository; "
                "put its code in the folder (mmke loads offline)"
            )
        inside(path, _module_file(ref), "config.json's auto_map")
    return auto_map


def _refs(auto_map: dict[str, Any]) -> list[str]:
    """Every ``module.Class`` an auto_map names (a tokenizer entry is a [slow, fast] pair)."""
    values = [v for entry in auto_map.values() for v in (entry if isinstance(entry, list) else [entry])]
    return [str(v) for v in values if v is not None]


def _module_file(ref: str) -> str:
    return ref.rpartition("--")[2].rpartition(".")[0].replace(".", "/") + ".py"


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
    auto_map = remote_code(path)
    if auto_map and family in (None, RemoteCode.name):  # code mmke does not know: the folder declares it
        return RemoteCode.declared_in(path, auto_map)
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


def check_device(device: str | torch.device, path: Path) -> torch.device:
    """The device to load onto, refused up front when unparseable or absent (torch asserts deep inside)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"{path}: unknown device {str(device)!r}; {_DEVICES}") from None
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)  # torch.cuda, torch.mps, torch.xpu …
    if not hasattr(backend, "is_available"):
        raise ModelLoadError(f"{path}: cannot load onto device={str(device)!r}; {_DEVICES}")
    if not backend.is_available():
        raise ModelLoadError(
            f"{path}: device={str(device)!r} but this machine has no {dev.type.upper()} device "
            f"(torch.{dev.type}.is_available() is False); use device=cpu"
        )
    count = backend.device_count()
    if dev.index is not None and dev.index >= count:
        raise ModelLoadError(
            f"{path}: device={str(device)!r} but this machine has {count} {dev.type.upper()} device(s) "
            f"({dev.type}:0 to {dev.type}:{count - 1})"
        )
    return dev


def load_model(
    family: Family,
    config: Any,
    path: Path,
    dtype: str | torch.dtype,
    device: torch.device,
    allow_pickle: bool = False,
) -> nn.Module:
    """Check the weights, then build the model with ``from_pretrained``; pickle only when ``allow_pickle``."""
    safe = check_weights(config, path, allow_pickle)
    try:  # a family refuses a config it cannot drive (BLIP-2 with Flan-T5) in a line of its own
        cls = family.model_class(config)
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    # straight onto an accelerator (no CPU copy first); plain CPU loading needs no accelerate
    placement = {} if device.type == "cpu" else {"device_map": str(device)}
    # with safetensors, transformers must not fall back to a pickle file; None: its default lookup
    use_safetensors = True if safe else None
    with _held_load_report() as reports:
        try:
            model = cls.from_pretrained(
                path, dtype=_dtype(dtype), local_files_only=True, use_safetensors=use_safetensors, **placement
            )
        except (ImportError, ValueError, TypeError, OSError, KeyError, RuntimeError, SafetensorError) as e:
            raise ModelLoadError(f"{path}: {_weights_problem(cls, e, reports)}") from None
    for report in reports:  # loaded: transformers' report (missing or unexpected keys) goes out as it was
        logging.getLogger(report.name).handle(report)
    family.check_model(model)
    log.info("loaded %s (%s, family %s) on %s", path, cls.__name__, family.name, device)
    _warn_half_on_cpu(model, path, device)
    return model.eval()


@contextmanager
def _held_load_report() -> Iterator[list[logging.LogRecord]]:
    """Hold back transformers' multi-line LOAD REPORT warning while ``from_pretrained`` runs.

    A failed load summarises it in its one line; a successful one logs the held records after.
    """
    logger = logging.getLogger("transformers.modeling_utils")
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" not in record.getMessage():
            return True
        held.append(record)
        return False

    logger.addFilter(hold)
    try:
        yield held
    finally:
        logger.removeFilter(hold)


def _weights_problem(cls: type, error: BaseException, reports: list[logging.LogRecord]) -> str:
    """One line for a failed ``from_pretrained``: tensors whose shapes disagree with config.json by name."""
    mismatched = [m for r in reports for m in _MISMATCH.findall(r.getMessage())]
    if "ignore_mismatched_sizes" in str(error) and mismatched:
        shown = ", ".join(mismatched[:3]) + (
            f" and {len(mismatched) - 3} more" if len(mismatched) > 3 else ""
        )
        return f"weights do not fit config.json: {len(mismatched)} tensor(s) have other shapes ({shown})"
    return f"cannot load {cls.__name__} weights ({_first_line(error)})"


def _warn_half_on_cpu(model: nn.Module, path: Path, device: torch.device) -> None:
    """float16 on CPU loads and scores, but gradient steps overflow: say so once, refuse nothing."""
    if device.type == "cpu" and any(p.dtype == torch.float16 for p in model.parameters()):
        log.warning(
            "%s: loaded in float16 on CPU; edits that train (FT, LoRA, MEND …) will likely produce NaN: "
            "use dtype=float32 or bfloat16 on CPU",
            path,
        )


# --- weight files ---------------------------------------------------------------------------


def check_weights(config: Any, path: Path, allow_pickle: bool) -> bool:
    """Check the weight files ``from_pretrained`` will read, before it builds anything.

    True when they are safetensors (each file's header must parse and match its size). False
    when only pickle weights exist and ``allow_pickle`` is set; refused otherwise.
    """
    entry = _safetensors_entry(config, path)
    if entry is None:
        _check_pickle(path, allow_pickle)
        return False
    shards = _index_shards(entry, path) if entry.name.endswith(".index.json") else [entry]
    for shard in shards:
        _check_safetensors(shard, path)
    return True


def _safetensors_entry(config: Any, path: Path) -> Path | None:
    """The safetensors file or index ``from_pretrained`` opens: the config's ``transformers_weights``
    when set (None when that is not safetensors), else the first of ``_SAFE_WEIGHTS`` present."""
    named = str(getattr(config, "transformers_weights", None) or "")
    if named:
        safe = named.endswith((".safetensors", ".safetensors.index.json"))
        return inside(path, named, "config.json's transformers_weights") if safe else None
    return next((path / n for n in _SAFE_WEIGHTS if (path / n).is_file()), None)


def _check_pickle(path: Path, allow_pickle: bool) -> None:
    """No safetensors: pickle weight files (``pytorch_model.bin`` …) load only when allowed."""
    pickles = sorted(f.name for f in path.iterdir() if f.suffix in _PICKLE_SUFFIXES and f.is_file())
    if not pickles:
        raise ModelLoadError(f"{path}: no weights ({' or '.join(_SAFE_WEIGHTS)} missing)")
    if not allow_pickle:
        raise ModelLoadError(
            f"{path}: weights are in pickle format ({', '.join(pickles)}), which can run code when loaded; "
            "convert them to safetensors, or pass allow_pickle=true if you trust this folder"
        )


def _index_shards(index: Path, path: Path) -> list[Path]:
    """The shard files a ``*.safetensors.index.json`` maps tensors to, each checked to exist."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelLoadError(
            f"{path}: {index.name} is corrupt ({type(e).__name__}: {_first_line(e)})"
        ) from None
    shards = [inside(path, str(n), index.name) for n in names]
    missing = [n for n, s in zip(names, shards, strict=True) if not s.is_file()]
    if missing:
        raise ModelLoadError(
            f"{path}: {index.name} names shards missing from the folder: {', '.join(missing)}"
        )
    return shards


def inside(path: Path, name: str, where: str) -> Path:
    """``path / name``, refused when it points outside the folder ``path``."""
    file = path / name
    if not file.resolve().is_relative_to(path.resolve()):
        raise ModelLoadError(f"{path}: {where} names {name!r}, outside the folder")
    return file


def _check_safetensors(file: Path, path: Path) -> None:
    """Parse a safetensors header (offsets, shapes, dtypes against the file size) without loading data."""
    if not file.is_file():
        raise ModelLoadError(f"{path}: {file.name} is missing")
    try:
        with safe_open(file, framework="pt"):
            pass
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read {file.name} ({_first_line(e)})") from None
    except SafetensorError as e:
        raise ModelLoadError(f"{path}: {file.name} is corrupt ({_safetensors_problem(file, e)})") from None


def _safetensors_problem(file: Path, error: BaseException) -> str:
    """What is wrong with a safetensors file, in sizes where a size is the problem."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated: {size} bytes, not even the 8-byte header length"
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            return f"header length {header_len} exceeds the file's {size} bytes: truncated or not safetensors"
        header = f.read(header_len) if header_len <= _MAX_HEADER else b""
    try:
        entries = json.loads(header).values()
        end = max((e["data_offsets"][1] for e in entries if "data_offsets" in e), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        end = None
    described = 8 + header_len + end if isinstance(end, int) else size
    if described != size:
        gist = "truncated" if described > size else "trailing bytes"
        return f"{gist}: the header describes {described} bytes, the file has {size}"
    return "bad header: " + _first_line(error).removeprefix("Error while deserializing header: ")


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
