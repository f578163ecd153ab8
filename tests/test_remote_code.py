"""Models whose code ships in their folder: refused without trust_remote_code, driven by
mmke_model.yaml with it.

The model is fabricated as remote-code authors ship theirs: ``tests/fixtures/tinyremote/`` holds its
configuration, modeling and processing files (a CLIP tower ``visual``, an MLP ``connector``, a
Llama decoder ``llm``: names no transformers class uses), ``register_for_auto_class`` copies them
into the folder and writes config.json's ``auto_map``; loading then imports them from the folder.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from _runs import small_overrides
from mmke.config import load_config
from mmke.data.images import ImageStore
from mmke.errors import ModelLoadError
from mmke.eval.job import run
from mmke.eval.store import RunStore
from mmke.models import LVLM, LayoutError
from mmke.models.families.remote import DECLARATION
from mmke.models.tiny import bpe_tokenizer
from test_matrix import SETTINGS, _check_changed, _editor, on_device
from test_matrix import cache as cache  # the editors' cache, in a temporary folder
from test_methods import assert_state, make_case, state
from test_methods import store as store  # the image fixture
from test_model_folders import PICKLE_WORDS, load_error, to_pickle

IMAGE, PATCH = 32, 8
DECLARED = """\
# what mmke cannot infer about code it does not know
auto_class: AutoModelForCausalLM
inputs: processor
layout:
  decoder_layers: llm.model.layers
  vision_tower: visual
  vision_layers: visual.encoder.layers
  projector: connector
  mlp: mlp
  mlp_out: mlp.down_proj
  attention: self_attn
prompt:
  format: "USER: {image}{prompt} ASSISTANT:"
  image: "<image>"
  image_suffix: "\\n"
"""


def fabricate(folder: Path, seed: int = 0) -> Path:
    """Save the tiny remote-code model in ``folder``: its code files, config.json with ``auto_map``,
    safetensors weights, tokenizer and processor, and its ``mmke_model.yaml``."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from fixtures.tinyremote.configuration_tinyremote import TinyRemoteConfig
    from fixtures.tinyremote.modeling_tinyremote import TinyRemoteForCausalLM
    from fixtures.tinyremote.processing_tinyremote import TinyRemoteProcessor

    tok = bpe_tokenizer(["<image>"])
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = TinyRemoteConfig(
        vocab_size=len(tok),
        visual=vision | {"image_size": IMAGE, "patch_size": PATCH},
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    TinyRemoteConfig.register_for_auto_class()
    TinyRemoteForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    TinyRemoteProcessor.register_for_auto_class("AutoProcessor")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        TinyRemoteForCausalLM(config).save_pretrained(folder)
    crop = {"height": IMAGE, "width": IMAGE}
    images = LlavaImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size=crop)
    TinyRemoteProcessor(images, tok, patches=(IMAGE // PATCH) ** 2).save_pretrained(folder)
    (folder / DECLARATION).write_text(DECLARED, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fabricate(tmp_path_factory.mktemp("remote") / "tinyremote")


@pytest.fixture
def folder(saved: Path, tmp_path: Path) -> Path:
    """A copy to spoil; same folder name and code, so transformers reuses its copy of the modules."""
    return Path(shutil.copytree(saved, tmp_path / "tinyremote"))


@pytest.fixture(scope="module")
def remote(saved: Path, store: ImageStore) -> LVLM:
    return on_device(LVLM.load(saved, trust_remote_code=True)).bind_images(store)


# --- the opt-in -------------------------------------------------------------------------------


def test_a_folder_whose_model_is_its_code_is_refused_without_opt_in(folder: Path) -> None:
    marker = folder.parent / "ran"
    config_code = folder / "configuration_tinyremote.py"
    config_code.write_text(f"open({str(marker)!r}, 'w').close()\n" + config_code.read_text())
    message = load_error(folder)
    assert "trust_remote_code=true" in message and "runs that code" in message
    assert "configuration_tinyremote.py" in message and "modeling_tinyremote.py" in message
    assert not marker.exists(), "the folder's code ran before the user opted in"


def test_code_from_another_repository_is_refused_even_with_opt_in(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = "someone/else--modeling_tinyremote.TinyRemoteForCausalLM"
    (folder / "config.json").write_text(json.dumps(config))
    assert "from another repository" in load_error(folder, trust_remote_code=True)


def test_with_opt_in_it_loads_and_its_declared_layout_resolves(remote: LVLM) -> None:
    layout = remote.layout
    assert remote.family.name == "remote"
    assert type(remote.model).__name__ == "TinyRemoteForCausalLM"
    assert type(remote.processor).__name__ == "TinyRemoteProcessor"  # the folder's own, trusted too
    assert layout.decoder_layers() == ["llm.model.layers.0", "llm.model.layers.1"]
    assert layout.vision_layers() == ["visual.encoder.layers.0", "visual.encoder.layers.1"]
    assert (layout.vision_tower(), layout.projector()) == ("visual", "connector")
    assert layout.mlp(-1) == "llm.model.layers.1.mlp"
    assert layout.mlp_out(0) == "llm.model.layers.0.mlp.down_proj"
    assert layout.attention(-1) == "llm.model.layers.1.self_attn"
    assert (layout.embeddings(), layout.lm_head()) == ("llm.model.embed_tokens", "llm.lm_head")
    with pytest.raises(LayoutError, match="Q-Former"):
        layout.qformer()


def test_the_declared_prompt_is_written_and_the_image_reaches_the_model(remote: LVLM) -> None:
    case = make_case()
    assert remote.prompt_text(case.edit) == "USER: <image>\nwhat is the capital of france? ASSISTANT:"
    red, blue = remote.score([case.edit, make_case(image="blue.png").edit])
    assert math.isfinite(red.nll) and red.nll != blue.nll
    (answer,) = remote.generate([case.edit], max_new_tokens=3)
    assert isinstance(answer, str)


def test_weights_are_checked_as_for_any_folder(folder: Path) -> None:
    assert PICKLE_WORDS in load_error(to_pickle(folder), trust_remote_code=True)


@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_every_method_edits_and_restores(method: str, remote: LVLM) -> None:
    case = make_case()
    editor = _editor(method, remote)
    before = state(remote)
    (pre,) = remote.score([case.edit])
    with editor.applied(remote, case) as edited:
        (post,) = edited.score([case.edit])
        assert math.isfinite(post.nll), f"{method}: non-finite NLL after the edit"
        _check_changed(method, pre.nll, post.nll)
    assert_state(remote, before)


# --- a bad mmke_model.yaml ----------------------------------------------------------------------


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        *parents, last = key.split(".")
        node = data
        for part in parents:
            node = node[part]
        if value is None:
            del node[last]
        else:
            node[last] = value

    return change


BAD = {
    "unknown key": (_set("layout.projectr", "connector"), "unknown key 'layout.projectr'; did you mean"),
    "missing key": (_set("prompt.format", None), "prompt.format: missing (required)"),
    "absent module": (
        _set("layout.projector", "adapter"),
        "layout.projector: TinyRemoteForCausalLM has no module",
    ),
    "absent in a layer": (
        _set("layout.mlp_out", "mlp.c_proj"),
        "layout.mlp_out: TinyRemoteForCausalLM has no",
    ),
    "format fields": (
        _set("prompt.format", "Q: {question} A:"),
        "prompt.format: needs the fields {image} and",
    ),
    "auto class": (_set("auto_class", "AutoModel"), "auto_class: 'AutoModel' is not a model entry"),
    "inputs": (_set("inputs", "paths"), "inputs: 'paths' is not one of: processor"),
    "wrong type": (_set("layout.decoder_layers", ["a", "b"]), "layout.decoder_layers: expected a non-empty"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_declaration_is_one_line_naming_the_file_and_key(name: str, folder: Path) -> None:
    change, expected = BAD[name]
    file = folder / DECLARATION
    data = yaml.safe_load(file.read_text(encoding="utf-8"))
    change(data)
    file.write_text(yaml.safe_dump(data), encoding="utf-8")
    message = load_error(folder, trust_remote_code=True)
    assert message.startswith(f"{file}: ") and expected in message, message


def test_a_missing_or_unreadable_declaration_is_one_line(folder: Path) -> None:
    file = folder / DECLARATION
    file.write_text("layout: [", encoding="utf-8")
    assert f"{file} line" in load_error(folder, trust_remote_code=True)
    file.unlink()
    assert f"{DECLARATION} is missing" in load_error(folder, trust_remote_code=True)


def test_a_run_opts_in_with_the_setting(saved: Path, setup: tuple[Path, Path], tmp_path: Path) -> None:
    """``mmke run model=DIR trust_remote_code=true`` edits the folder's model; without the setting
    the run stops before anything is imported."""
    argv = [*small_overrides(setup, tmp_path / "no"), f"model={saved}", "limit=1", "methods=[ft_llm]"]
    with pytest.raises(ModelLoadError, match="pass trust_remote_code=true"):
        run(load_config(None, argv), RunStore.create(tmp_path / "no", None, {}))
    argv = [*small_overrides(setup, tmp_path / "yes"), f"model={saved}", "limit=1", "methods=[ft_llm]"]
    cfg = load_config(None, [*argv, "trust_remote_code=true"])
    summary = run(cfg, RunStore.create(tmp_path / "yes", None, cfg.to_dict()))
    assert {(g.method, g.n_cases) for g in summary.groups} == {("ft_llm", 1)}  # its type and all
