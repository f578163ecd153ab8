"""Image features of any family's model: the projector's output pooled per image (SERAC, image neighbours).

The projector (LLaVA's multimodal projector, BLIP-2's language projection, Qwen2-VL's merger,
Idefics3's connector) is where the vision side meets the language model, so its output is what
the language model sees of an image; the language model itself is never run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mmke.models.base import LVLM
from mmke.types import ImageRef, Sample


class _Stop(Exception):
    """Raised by the projector hook: the rest of the forward is not needed."""


def pooled_image_features(model: LVLM, refs: Sequence[ImageRef]) -> torch.Tensor:
    """The projector's output per image, mean- and max-pooled over its tokens (n, 2D); no grad, LM skipped.

    The images are opened from the model's bound store.
    """
    module = model.layout.module(model.layout.projector())
    seen: dict[str, torch.Tensor] = {}

    def grab(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        seen["y"] = out[0] if isinstance(out, tuple) else getattr(out, "last_hidden_state", out)
        raise _Stop

    batch = model.encode([Sample("image", "x", r) for r in refs])
    handle = module.register_forward_hook(grab)
    try:
        with torch.no_grad():
            model.family.forward(model.model, batch.inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    y = seen["y"].float()
    if y.ndim == 3 and y.shape[0] == len(refs):
        return torch.cat([y.mean(dim=1), y.amax(dim=1)], dim=-1)  # (n, 2D)
    if len(refs) == 1:  # tokens of all images flattened (Qwen2-VL's merger) or tiles (Idefics3)
        flat = y.reshape(-1, y.shape[-1])  # (T, D)
        return torch.cat([flat.mean(dim=0), flat.amax(dim=0)])[None]  # (1, 2D)
    return torch.cat([pooled_image_features(model, [r]) for r in refs])  # (n, 2D)
