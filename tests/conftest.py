"""Fixtures several test modules share: tiny random models of every family and a few images."""

from __future__ import annotations

import pytest
from PIL import Image

from mmke.data.images import ImageStore
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
def model(request: pytest.FixtureRequest) -> LVLM:
    """One tiny randomly initialised model per family (llava, blip2, qwen2_vl, idefics3, causal_lm…)."""
    return tiny_model(request.param, seed=0)
