"""Model folders that must not load quietly: corrupt safetensors, pickle weights, absent devices, fp16 on CPU.

Each failure is one ``ModelLoadError`` line naming the folder, raised before transformers builds a model.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmke.errors import ModelLoadError
from mmke.models import LVLM
from mmke.models.tiny import save_tiny, tiny_model

PICKLE_WORDS = "weights are in pickle format (pytorch_model.bin), which can run code when loaded"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny causal LM saved as safetensors with its tokenizer; tests corrupt copies of it."""
    return save_tiny(tiny_model("causal_lm", seed=0), tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def folder(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "model"))


def load_error(path: Path, **kwargs: object) -> str:
    """The message of the ModelLoadError that loading ``path`` raises; any other exception fails the test."""
    with pytest.raises(ModelLoadError) as err:
        LVLM.load(path, **kwargs)  # type: ignore[arg-type]
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message
    return message


def to_pickle(folder: Path) -> Path:
    """Replace model.safetensors with the same tensors in a torch.save pickle, as older checkpoints ship."""
    weights = folder / "model.safetensors"
    torch.save(load_file(weights), folder / "pytorch_model.bin")
    weights.unlink()
    return folder


# --- corrupt safetensors ----------------------------------------------------------------------


def test_truncated_safetensors_is_a_load_error(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    message = load_error(folder)
    assert "model.safetensors is corrupt (truncated" in message


def test_safetensors_shorter_than_its_header_length_is_a_load_error(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    assert "model.safetensors is corrupt (header length" in load_error(folder)
    weights.write_bytes(b"\x01\x02")
    assert "model.safetensors is corrupt (truncated" in load_error(folder)


def test_garbage_header_bytes_are_a_load_error(folder: Path) -> None:
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:24] = b"\xff" * 16  # inside the JSON header, keeping its length
    weights.write_bytes(bytes(data))
    assert "model.safetensors is corrupt (bad header" in load_error(folder)


def test_header_that_lies_about_sizes_is_a_load_error(folder: Path) -> None:
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [dim * 2 for dim in header[name]["shape"]]  # offsets now disagree
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    weights.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])
    assert "model.safetensors is corrupt (bad header" in load_error(folder)


def test_text_instead_of_safetensors_is_a_load_error(folder: Path) -> None:
    (folder / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\n")
    assert "model.safetensors is corrupt (header length" in load_error(folder)


def test_sharded_index_naming_a_missing_shard_is_a_load_error(folder: Path) -> None:
    tiny_model("causal_lm", seed=0).model.save_pretrained(folder, max_shard_size="40KB")
    (folder / "model.safetensors").unlink(missing_ok=True)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    assert LVLM.load(folder).model is not None  # the sharded folder loads while whole
    (folder / shard).unlink()
    assert f"model.safetensors.index.json names shards missing from the folder: {shard}" in load_error(folder)


# --- config.json against the weights -----------------------------------------------------------


def edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def test_config_vocab_that_disagrees_with_the_weights_is_one_line(
    folder: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """transformers logs a multi-line LOAD REPORT before raising; the error names the tensors instead."""
    edit_config(folder, vocab_size=json.loads((folder / "config.json").read_text())["vocab_size"] + 7)
    message = load_error(folder)
    assert "weights do not fit config.json: 2 tensor(s) have other shapes" in message
    assert "lm_head.weight" in message and "embed_tokens.weight" in message
    assert "LOAD REPORT" not in capfd.readouterr().err


def test_config_field_of_the_wrong_type_is_a_load_error(folder: Path) -> None:
    edit_config(folder, hidden_size="big")
    assert "bad value in config.json (Field 'hidden_size' expected int" in load_error(folder)


def test_deeply_nested_config_is_a_load_error(folder: Path) -> None:
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "unreadable config.json (nested too deeply)" in load_error(folder)


# --- pickle weights ---------------------------------------------------------------------------


def test_pickle_only_weights_are_refused_by_default(folder: Path) -> None:
    message = load_error(to_pickle(folder))
    assert PICKLE_WORDS in message and "allow_pickle=true" in message


def test_pickle_weights_load_when_allowed(folder: Path, saved: Path) -> None:
    loaded = LVLM.load(to_pickle(folder), allow_pickle=True)
    reference = LVLM.load(saved)
    for (name, got), (_, want) in zip(
        loaded.model.state_dict().items(), reference.model.state_dict().items(), strict=True
    ):
        assert torch.equal(got, want), name


def test_config_pointing_at_a_pickle_file_is_refused(folder: Path) -> None:
    """``transformers_weights`` in config.json makes transformers read that file even beside safetensors."""
    torch.save(load_file(folder / "model.safetensors"), folder / "adapter_model.bin")
    edit_config(folder, transformers_weights="adapter_model.bin")
    assert "weights are in pickle format (adapter_model.bin" in load_error(folder)


def test_folder_without_weights_is_a_load_error(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    assert "no weights (model.safetensors or model.safetensors.index.json missing)" in load_error(folder)


# --- devices ----------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_a_load_error(saved: Path, device: str) -> None:
    message = load_error(saved, device=device)
    assert f"device={device!r} but this machine has no CUDA device" in message
    assert "torch.cuda.is_available() is False" in message and "use device=cpu" in message


def test_cuda_index_beyond_the_device_count_is_a_load_error(
    saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "device='cuda:1' but this machine has 1 CUDA device(s) (cuda:0 to cuda:0)" in load_error(
        saved, device="cuda:1"
    )


@pytest.mark.parametrize("device", ["gpu", "cuda:x", ""])
def test_unparseable_device_is_a_load_error(saved: Path, device: str) -> None:
    assert f"unknown device {device!r}" in load_error(saved, device=device)


# --- dtypes -----------------------------------------------------------------------------------


def test_float16_on_cpu_warns_once_and_bfloat16_does_not(
    saved: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="mmke"):
        model = LVLM.load(saved, dtype="float16")
    assert model.dtype == torch.float16  # loaded all the same
    warnings = [r for r in caplog.records if "float16 on CPU" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].name.startswith("mmke")
    assert "NaN" in warnings[0].getMessage() and "float32 or bfloat16" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mmke"):
        LVLM.load(saved, dtype="bfloat16")
        LVLM.load(saved, dtype="float32")
    assert not [r for r in caplog.records if "float16 on CPU" in r.getMessage()]
