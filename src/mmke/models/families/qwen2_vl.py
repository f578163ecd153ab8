"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: ViT with 2x2 patch merger, decoder with multimodal RoPE.

Papers: Wang et al., "Qwen2-VL: Enhancing Vision-Language Model's Perception of the World at Any
Resolution", 2024; Bai et al., "Qwen2.5-VL Technical Report", 2025. Prompts go through the chat
template; the answer follows ``<|im_start|>assistant\\n`` with no separator.
"""

from __future__ import annotations

from typing import Any

from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from mmke.models.families._base import Family, LayoutSpec
from mmke.registry import register_family


def image_only(base: type[Any]) -> type[Any]:
    """``base`` (a Qwen-VL processor) without its video half, whose processor needs torchvision.

    Images and text are processed exactly as by ``base``; the subclass's signature lists only two
    sub-processors, so ProcessorMixin never asks for (or type-checks) a video processor. It saves
    as ``base``, so a saved directory looks like any checkpoint of that model.
    """

    def __init__(
        self: Any, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None
    ):
        base.__init__(self, image_processor, tokenizer, video_processor=None, chat_template=chat_template)

    def to_dict(self: Any) -> dict[str, Any]:
        return base.to_dict(self) | {"processor_class": base.__name__}

    return type(f"ImageOnly{base.__name__}", (base,), {"__init__": __init__, "to_dict": to_dict})


#: Qwen2-VL's processor for images only (Qwen2.5-VL's processes images the same way).
ImageOnlyQwen2VLProcessor = image_only(Qwen2VLProcessor)


@register_family("qwen2_vl")
class Qwen2VL(Family):
    """Qwen2-VL / Qwen2.5-VL: native-resolution ViT, patch merger, Qwen2 decoder with M-RoPE."""

    name = "qwen2_vl"
    image_only_processor = ImageOnlyQwen2VLProcessor
    architectures = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    model_types = ("qwen2_vl", "qwen2_5_vl")
    plain_format = "{image}{prompt}"
    image_suffix = ""
    layout_spec = LayoutSpec(
        decoder_layers=("model.language_model.layers", "model.layers"),
        vision_tower=("model.visual", "visual"),
        vision_layers=("model.visual.blocks", "visual.blocks"),
        projector=("model.visual.merger", "visual.merger"),
    )

    def image_placeholder(self, processor: Any) -> str:
        return f"<|vision_start|>{processor.image_token}<|vision_end|>"


@register_family("qwen3_vl")
class Qwen3VL(Qwen2VL):
    """Qwen3-VL: Qwen2-VL's layout, prompt and processing, with DeepStack vision features fed to
    early decoder layers and interleaved M-RoPE (inside the model; nothing mmke needs changes).
    Paper: Qwen Team, "Qwen3-VL Technical Report", 2025."""

    name = "qwen3_vl"
    architectures = ("Qwen3VLForConditionalGeneration",)
    model_types = ("qwen3_vl",)
    image_only_processor = image_only(Qwen3VLProcessor)
