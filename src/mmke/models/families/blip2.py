"""BLIP-2 (Blip2ForConditionalGeneration with OPT): ViT, Q-Former with learned queries, OPT decoder.

Paper: Li et al., "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image Encoders
and Large Language Models", ICML 2023. The prompt is the bare question (as EasyEdit/VLKEB feed
it); an image item starts with ``num_query_tokens`` image tokens before BOS, the order the
official processor uses, so query outputs land where the model expects them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from mmke.errors import ConfigError, ModelLoadError
from mmke.models.families._base import Encoded, Family, LayoutSpec, token_inputs
from mmke.registry import register_family


@register_family("blip2")
class Blip2(Family):
    """BLIP-2 with a decoder-only language model (OPT); the Q-Former is its connector."""

    name = "blip2"
    architectures = ("Blip2ForConditionalGeneration",)
    model_types = ("blip-2",)
    plain_format = "{prompt}"
    layout_spec = LayoutSpec(
        decoder_layers=("language_model.model.decoder.layers", "language_model.model.layers"),
        # OPT layers have no MLP module: mlp() falls back to the output projection fc2, and
        # mlp_modules() gives both of the MLP's linears
        mlp=("mlp",),
        mlp_parts=("fc1", "fc2"),
        vision_tower=("vision_model",),
        vision_layers=("vision_model.encoder.layers",),
        projector=("language_projection",),
        qformer=("qformer",),
    )

    def model_class(self, config: Any) -> type[nn.Module]:
        if not getattr(config, "use_decoder_only_language_model", True):
            text = getattr(getattr(config, "text_config", None), "model_type", "?")
            raise ModelLoadError(
                f"{self.name} with an encoder-decoder language model ({text}, e.g. Flan-T5) is not "
                "supported: mmke drives the decoder-only ones (OPT, LLaMA/Vicuna)"
            )
        return super().model_class(config)

    def image_text(self, processor: Any, has_image: bool, suffix: str | None = None) -> str:
        return ""  # image query tokens are inserted as ids in preprocess, before BOS

    def preprocess(
        self,
        processor: Any,
        texts: list[str],
        images: list[Image.Image | None],
        padding_side: str,
        add_special_tokens: bool,
        answer_starts: Sequence[int] | None = None,
    ) -> Encoded:
        tok = processor.tokenizer
        enc = tok(list(texts), add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        n_query = processor.num_query_tokens
        image_id = tok.convert_tokens_to_ids(str(processor.image_token))
        ids, spans = [], []
        for i, (row, offs, image) in enumerate(
            zip(enc["input_ids"], enc["offset_mapping"], images, strict=True)
        ):
            lead = n_query if image is not None else 0
            if image is not None and not lead and image_id not in row:
                # a processor that adds no query tokens expects the text to carry them (a converted
                # MiniGPT-4's chat template writes them inside <Img>...</Img>); without, no image
                raise ConfigError(
                    f"item {i}: has an image, but this prompt format writes no image tokens and the "
                    "processor adds none, so the model would never see it (a converted MiniGPT-4 "
                    "places them through its chat template: use scoring=mmke)"
                )
            ids.append([image_id] * lead + list(row))
            spans.append([(0, 0)] * lead + [tuple(o) for o in offs])
        inputs, offsets = token_inputs(processor, ids, spans, images, padding_side)
        return Encoded(inputs, offsets, [len(t) for t in texts])

    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor], cache: Any = None) -> Any:
        # no prefix reuse (reuses_prefix is off): the query outputs are spliced in by the model
        if "pixel_values" not in inputs:  # BLIP-2's forward needs images; text runs the LM alone
            return model.language_model(**inputs, use_cache=False)
        return model(**inputs, use_cache=False)

    def generate(self, model: nn.Module, inputs: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
        if "pixel_values" not in inputs:
            out = model.language_model.generate(**inputs, **kwargs)  # (B, T + N)
        else:
            out = model.generate(**inputs, **kwargs)  # (B, T + N): input_ids are passed through
        return out[:, inputs["input_ids"].shape[1] :]
