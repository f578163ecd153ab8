"""Fixtures several test modules share: tiny random models of every family, a few images, and a
small world with an untrained world model for end-to-end runs."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# transformers copies a remote-code model's modules here when it loads one (tests/test_remote_code.py);
# read when transformers is first imported, so set before mmke imports it: a test writes nothing in ~
if "HF_MODULES_CACHE" not in os.environ:
    os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="mmke-test-hf-modules-")
    atexit.register(shutil.rmtree, os.environ["HF_MODULES_CACHE"], ignore_errors=True)

import pytest
from PIL import Image

from mmke.bundled import WorldModelSpec, build_tokenizer, build_untrained, world_texts
from mmke.data.images import ImageStore
from mmke.data.world import WorldConfig, build_world
from mmke.models import LVLM
from mmke.models.tiny import TINY_KINDS, tiny_model


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ImageStore:
    """red.png (square), blue.png (4:3) and wide.png (8:3): sizes that exercise resizing."""
    root = tmp_path_factory.mktemp("images")
    Image.new("RGB", (32, 32), (220, 20, 20)).save(root / "red.png")
    Image.new("RGB", (40, 32), (20, 20, 220)).save(root / "blue.png")
    Image.new("RGB", (64, 24), (20, 200, 20)).save(root / "wide.png")
    return ImageStore(root)


@pytest.fixture(scope="module", params=TINY_KINDS)
def model(request: pytest.FixtureRequest, store: ImageStore) -> LVLM:
    """One tiny randomly initialised model per family (llava, blip2, qwen2_vl, idefics3, causal_lm…),
    bound to the module's ``store``."""
    return tiny_model(request.param, seed=0).bind_images(store)


@pytest.fixture(scope="session")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small world and an untrained smoke-size world model saved to disk (seconds to build)."""
    world = tmp_path_factory.mktemp("world")
    build_world(world, seed=0, config=WorldConfig.small())
    model_dir = tmp_path_factory.mktemp("model")
    lvlm = build_untrained(WorldModelSpec.smoke(), build_tokenizer(world_texts(world)))
    lvlm.model.save_pretrained(model_dir)
    lvlm.processor.save_pretrained(model_dir)
    return world, model_dir
