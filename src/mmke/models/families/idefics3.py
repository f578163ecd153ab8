"""Idefics3 and SmolVLM: SigLIP vision encoder, pixel-shuffle connector, Llama-style decoder.

Paper: Laurençon et al., "Building and better understanding vision-language models: insights
and future directions", 2024 (Idefics3); Marafioti et al., "SmolVLM", 2025. Without a chat
template the prompt is Idefics3's ``<|im_start|>User:<image>{prompt}<end_of_utterance>\\nAssistant:``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmke.models.families._base import Family, LayoutSpec
from mmke.registry import register_family


@register_family("idefics3")
class Idefics3(Family):
    """Idefics3 / SmolVLM: SigLIP encoder, pixel-shuffle + linear connector, Llama decoder."""

    name = "idefics3"
    architectures = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    model_types = ("idefics3", "smolvlm")
    plain_format = "<|im_start|>User:{image}{prompt}<end_of_utterance>\nAssistant:"
    image_suffix = ""
    layout_spec = LayoutSpec(
        decoder_layers=("model.text_model.layers", "model.language_model.layers"),
        vision_tower=("model.vision_model",),
        vision_layers=("model.vision_model.encoder.layers",),
        projector=("model.connector",),
    )

    def load_processor(self, path: Path) -> Any:
        from transformers import (
            AutoConfig,
            AutoImageProcessor,
            AutoProcessor,
            AutoTokenizer,
            Idefics3Processor,
        )

        try:
            return AutoProcessor.from_pretrained(path, local_files_only=True)
        except ImportError as e:  # SmolVLM's processor needs num2words (for video prompts only)
            first = e
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (ImportError, ValueError, TypeError, OSError):
            raise first from None
        vision = config.vision_config
        seq_len = (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2
        return Idefics3Processor(
            image_processor, tokenizer, image_seq_len=seq_len, chat_template=tokenizer.chat_template
        )
