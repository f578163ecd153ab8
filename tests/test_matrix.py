"""Every registered method on every model family: apply -> score -> restore, on tiny random models.

Per method the settings are the smallest that move a tiny random model. Each run checks that the
edit changed the edited probe's prediction (its target NLL fell) and that restore put every weight
back bit-identically. A method new to the registry fails ``test_every_method_is_in_the_matrix``
until it is added here.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch

from mmke.data.images import ImageStore
from mmke.methods import Editor
from mmke.models import LVLM, LayoutError
from mmke.models.tiny import TINY_KINDS, tiny_model
from mmke.registry import methods
from mmke.types import EditCase
from test_methods import assert_state, make_case, state
from test_methods import store as store  # the image fixture

#: One tiny model per family (qwen2_5_vl is a second model of family qwen2_vl).
FAMILIES = tuple(kind for kind in TINY_KINDS if kind != "qwen2_5_vl")

#: method -> settings for tiny models. Methods with a train step get a small train split below.
SETTINGS: dict[str, dict[str, Any]] = {
    "ft": {"lr": 1e-2, "steps": 20},
    "ft_llm": {"lr": 1e-2, "steps": 20},
    "ft_projector": {"lr": 1e-2, "steps": 20},
    "ft_vision": {"lr": 1e-2, "steps": 20},
    "lora": {"lr": 5e-2, "steps": 20},
    "grace": {},
    "rome": {"v_steps": 30, "v_lr": 0.5},
    "memit": {"v_steps": 30, "v_lr": 0.5},
    "wise": {"steps": 50, "lr": 0.3},
    "serac": {"train_steps": 60},
    "mend": {"train_steps": 30},
    "ke": {"train_steps": 30},
    "ike": {"k": 1},
    "alphaedit": {"v_steps": 30, "v_lr": 0.5},
    "ultraedit": {"lr": 1e-2},
    "tpatcher": {},
    "visedit": {"train_steps": 30, "train_lr": 3e-3, "mid_dim": 64, "mapper_dim": 64, "samples": 8},
    "liveedit": {"train_steps": 30, "train_lr": 1e-2},
}
#: prompt-only methods change what the model is asked, not the model: compare through the handle
PROMPT_ONLY = {"ike", "noop"}
#: (method, family) pairs where the method's edit site does not exist: a clear error is the answer
NO_SITE = {("ft_projector", "causal_lm"), ("ft_vision", "causal_lm")}

TRAIN_FACTS = (
    ("berlin", "what is the capital of germany?"),
    ("tokyo", "what city is in japan?"),
    ("madrid", "the capital of spain is"),
    ("lisbon", "which city is in portugal?"),
)


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMKE_CACHE", str(tmp_path / "cache"))


def _train_cases(model: LVLM) -> list[EditCase]:
    """A few facts, and the matrix's own edit: a few meta-training steps cannot teach a tiny random
    model to generalise to unseen edits, so trained editors are checked for wiring on a seen one.
    """
    image = "blue.png" if model.family.multimodal else None
    facts = [make_case(target=t, prompt=p, image=image) for t, p in TRAIN_FACTS]
    return [*facts, make_case(image="red.png" if model.family.multimodal else None)]


def _editor(method: str, model: LVLM) -> Editor[Any]:
    editor: Editor[Any] = methods.get(method)(SETTINGS.get(method))
    if editor.needs_train_cases:
        editor.train(model, _train_cases(model))
    return editor


def test_every_method_is_in_the_matrix() -> None:
    assert set(methods.names()) - {"noop"} <= set(SETTINGS), "add new methods to SETTINGS"


#: ``bench/gpu_check.sh`` runs this matrix on an accelerator (MMKE_TEST_DEVICE=cuda,
#: MMKE_TEST_DTYPE=bfloat16); unset, it runs on the CPU in float32.
DEVICE = os.environ.get("MMKE_TEST_DEVICE", "cpu")
DTYPE = getattr(torch, os.environ.get("MMKE_TEST_DTYPE", "float32"))
#: How far the accelerator's pre-edit scores may be from the CPU's float32 ones: each probe's mean
#: target NLL within this share of it (plus as much in nats), bfloat16 keeping 8 bits of mantissa.
DEVICE_NLL_TOLERANCE = 0.05


def on_device(model: LVLM) -> LVLM:
    model.model.to(DEVICE, DTYPE)
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_method_edits_and_restores_on_family(method: str, family: str, store: ImageStore) -> None:
    model = on_device(tiny_model(family)).bind_images(store)
    case = make_case(image="red.png" if model.family.multimodal else None)
    if (method, family) in NO_SITE:
        with pytest.raises(LayoutError, match=r"has no (projector|vision)"):
            _editor(method, model).apply(model, case)
        return
    editor = _editor(method, model)
    before = state(model)
    (pre,) = model.score([case.edit])
    with editor.applied(model, case) as edited:
        (post,) = edited.score([case.edit])
        assert math.isfinite(post.nll), f"{method}: non-finite NLL after the edit"
        _check_changed(method, pre.nll, post.nll)
    assert_state(model, before)


@pytest.mark.skipif(DEVICE == "cpu", reason="compares an accelerator (MMKE_TEST_DEVICE) with the CPU")
@pytest.mark.parametrize("family", FAMILIES)
def test_device_scores_agree_with_the_cpu(family: str, store: ImageStore) -> None:
    cpu = tiny_model(family).bind_images(store)
    device = on_device(tiny_model(family)).bind_images(store)
    case = make_case(image="red.png" if cpu.family.multimodal else None)
    probes = [case.edit, *case.probes]
    for a, b in zip(cpu.score(probes), device.score(probes), strict=True):
        assert math.isfinite(b.nll)
        assert abs(a.nll - b.nll) <= DEVICE_NLL_TOLERANCE * (1 + abs(a.nll)), (family, a.nll, b.nll)


def _check_changed(method: str, pre: float, post: float) -> None:
    if method in PROMPT_ONLY:
        assert post != pre, f"{method}: the prompt rewrite did not reach the model"
    else:
        assert post < pre - 0.1, f"{method}: edit NLL {pre:.3f} -> {post:.3f}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["ft_llm", "ft_projector", "lora"])
def test_replaying_the_frozen_prefix_gives_the_same_edit_with_fewer_passes(
    method: str, family: str, store: ImageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stages before the edit site run once per edit, and the edited weights come out the same."""
    if (method, family) in NO_SITE:
        pytest.skip("no such site on a text-only model")
    model = tiny_model(family, seed=0).bind_images(store)
    case = make_case(image=None if family == "causal_lm" else "red.png")
    first = model.layout.module(model.layout.decoder_layers()[0])
    calls = []
    first.register_forward_hook(lambda *_: calls.append(1))

    def edit() -> tuple[dict, int]:
        calls.clear()
        torch.manual_seed(0)
        edited = methods.get(method)({**SETTINGS[method], "steps": 5})
        handle = edited.apply(model, case)
        after = state(model)
        handle.restore()
        return after, len(calls)

    replayed, replayed_calls = edit()
    monkeypatch.setattr("mmke.methods.ft.frozen_prefix_replayed", lambda *_: nullcontext())
    monkeypatch.setattr("mmke.methods.lora.frozen_prefix_replayed", lambda *_: nullcontext())
    plain, plain_calls = edit()
    assert replayed.keys() == plain.keys()
    assert [k for k in plain if not torch.allclose(replayed[k], plain[k], atol=1e-6)] == []
    assert plain_calls == 5
    assert replayed_calls == (5 if method == "ft_projector" and family != "causal_lm" else 1)
