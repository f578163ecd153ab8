"""Building a fresh (untrained) LLaVA from sizes and a tokenizer (tiny test models, the world model)."""

from __future__ import annotations

from typing import Any

import torch

from mmke.models.base import LVLM


def llava_from_sizes(
    tokenizer: Any, vision: dict[str, Any], text: dict[str, Any], image_size: int, seed: int
) -> LVLM:
    """A randomly initialised ``LlavaForConditionalGeneration`` with its ``LlavaProcessor``.

    ``vision`` holds CLIPVisionConfig fields (``patch_size`` among them), ``text`` LlamaConfig
    fields; the tokenizer must know ``<image>``.
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    # CLIP keeps a CLS token (num_additional_image_tokens=1) that "default" selection drops again
    processor = LlavaProcessor(
        image_processor,
        tokenizer,
        patch_size=vision["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    ids = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=image_size, **vision),
        text_config=LlamaConfig(**(ids | text)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():  # leave the caller's RNG as it was
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    return LVLM(model, processor, "llava")
