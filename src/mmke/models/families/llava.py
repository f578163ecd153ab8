"""LLaVA (LlavaForConditionalGeneration): CLIP vision tower, MLP projector, Llama-style decoder.

Paper: Liu et al., "Visual Instruction Tuning", NeurIPS 2023. Without a chat template the
prompt is LLaVA-1.5's ``USER: <image>\\n{prompt} ASSISTANT:``.
"""

from __future__ import annotations

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
