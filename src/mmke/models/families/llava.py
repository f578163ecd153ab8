"""LLaVA (LlavaForConditionalGeneration): CLIP vision tower, MLP projector, Llama-style decoder.

Paper: Liu et al., "Visual Instruction Tuning", NeurIPS 2023. Without a chat template the
prompt is LLaVA-1.5's ``USER: <image>\\n{prompt} ASSISTANT:``.
"""

from __future__ import annotations

from typing import Any

from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from mmke.models.families._base import Family, LayoutSpec
from mmke.registry import register_family


@register_family("llava")
class Llava(Family):
    """LLaVA-1.5 style: CLIP vision tower + MLP projector + Llama/Mistral/Vicuna decoder."""

    name = "llava"
    reuses_prefix = True
    architectures = ("LlavaForConditionalGeneration",)
    model_types = ("llava",)
    layout_spec = LayoutSpec(
        # transformers >= 4.52 nests the decoder under model.language_model; older: language_model.model
        decoder_layers=("model.language_model.layers", "language_model.model.layers", "model.layers"),
        vision_tower=("model.vision_tower", "vision_tower"),
        vision_layers=(
            "model.vision_tower.vision_model.encoder.layers",
            "model.vision_tower.encoder.layers",
            "vision_tower.vision_model.encoder.layers",
        ),
        projector=("model.multi_modal_projector", "multi_modal_projector"),
    )


@register_family("llava_next")
class LlavaNext(Llava):
    """LLaVA-NeXT (LLaVA-1.6): LLaVA's parts, images tiled at any resolution ("anyres") with a
    learned row separator; everything mmke needs is LLaVA's. Paper: Liu et al., "LLaVA-NeXT:
    Improved reasoning, OCR, and world knowledge", 2024."""

    name = "llava_next"
    architectures = ("LlavaNextForConditionalGeneration",)
    model_types = ("llava_next",)


class ImageOnlyLlavaOnevisionProcessor(LlavaOnevisionProcessor):
    """LLaVA-OneVision's processor without its video half (whose processor needs torchvision).

    Its signature is the base's less the video processor: ProcessorMixin reads the argument names
    from it to save and load the processor's settings (``num_image_tokens`` among them).
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        num_image_tokens: int | None = None,
        vision_feature_select_strategy: str | None = None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        video_token: str = "<video>",
        vision_aspect_ratio: str = "anyres_max_9",
        **kwargs: Any,
    ):
        super().__init__(
            image_processor,
            tokenizer,
            None,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )

    def to_dict(self) -> dict[str, Any]:
        return super().to_dict() | {"processor_class": "LlavaOnevisionProcessor"}


@register_family("llava_onevision")
class LlavaOnevision(Llava):
    """LLaVA-OneVision: LLaVA's parts (SigLIP tower, MLP projector, Qwen2 decoder), anyres images
    and a chat template. Paper: Li et al., "LLaVA-OneVision: Easy Visual Task Transfer", 2024."""

    name = "llava_onevision"
    architectures = ("LlavaOnevisionForConditionalGeneration",)
    model_types = ("llava_onevision",)
    image_only_processor = ImageOnlyLlavaOnevisionProcessor
