"""InternVL 2.5 / 3 (InternVLForConditionalGeneration, transformers' native port): InternViT, pixel
shuffle + MLP projector, Qwen2 decoder.

Papers: Chen et al., "Expanding Performance Boundaries of Open-Source Multimodal Models with Model,
Data, and Test-time Scaling", 2024 (InternVL 2.5); Zhu et al., "InternVL3: Exploring Advanced
Training and Test-Time Recipes for Open-Source Multimodal Models", 2025. Prompts go through the
ChatML chat template, whose image is ``<IMG_CONTEXT>\\n``; the processor expands it to
``<img>`` + the image's tiles' context tokens + ``</img>``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from transformers.models.internvl.processing_internvl import InternVLProcessor

from mmke.models.families.llava import Llava
from mmke.registry import register_family


class ImageOnlyInternVLProcessor(InternVLProcessor):
    """InternVL's processor without its video half (whose processor needs torchvision).

    Its signature is the base's less the video processor: ProcessorMixin reads the argument names
    from it to save and load ``image_seq_length`` (context tokens per tile).
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        image_seq_length: int = 256,
        chat_template: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(
            image_processor,
            tokenizer,
            None,
            image_seq_length=image_seq_length,
            chat_template=chat_template,
            **kwargs,
        )

    def to_dict(self) -> dict[str, Any]:
        return super().to_dict() | {"processor_class": "InternVLProcessor"}


@register_family("internvl")
class InternVL(Llava):
    """InternVL 2.5 / 3: InternViT, pixel-shuffle + MLP projector, Qwen2 decoder (LLaVA's layout).

    What differs from LLaVA: InternViT's layers sit under ``encoder.layer``, and a folder without a
    chat template gets ChatML. Positions follow the tokens, so a shared prefix is reused. Paper:
    Zhu et al., "InternVL3: Exploring Advanced Training and Test-Time Recipes for Open-Source
    Multimodal Models", 2025.
    """

    name = "internvl"
    architectures = ("InternVLForConditionalGeneration",)
    model_types = ("internvl",)
    image_only_processor = ImageOnlyInternVLProcessor
    plain_format = "<|im_start|>user\n{image}{prompt}<|im_end|>\n<|im_start|>assistant\n"
    layout_spec = replace(Llava.layout_spec, vision_layers=("model.vision_tower.encoder.layer",))
