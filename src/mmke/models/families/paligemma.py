"""PaliGemma and PaliGemma 2 (PaliGemmaForConditionalGeneration): SigLIP encoder, linear projector,
Gemma / Gemma 2 decoder run as a prefix LM.

Papers: Beyer et al., "PaliGemma: A versatile 3B VLM for transfer", 2024; Steiner et al.,
"PaliGemma 2: A Family of Versatile VLMs for Transfer", 2024. As the official processor writes it,
an item is ``<image>`` x N, BOS, the prompt and a line break (the prefix, ``token_type_ids`` 0,
attended both ways), then the answer (the suffix, ``token_type_ids`` 1, causal); prefix and suffix
are tokenised apart, as the processor does with its ``suffix``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from mmke.models.families._base import Encoded, Family, LayoutSpec, pad_rows, token_inputs
from mmke.registry import register_family


@register_family("paligemma")
class PaliGemma(Family):
    """PaliGemma / PaliGemma 2: SigLIP tower, linear projector, Gemma decoder with a bidirectional prefix.

    The suffix starts where the answer does (``answer_starts``), so a target with line breaks of
    its own stays whole. Positions count from 1 and the prefix is attended both ways, so a shared
    prefix is not reused. Paper: Beyer et al., "PaliGemma: A versatile 3B VLM for transfer", 2024.
    """

    name = "paligemma"
    architectures = ("PaliGemmaForConditionalGeneration",)
    model_types = ("paligemma",)
    plain_format = "{prompt}\n"
    layout_spec = LayoutSpec(
        decoder_layers=("model.language_model.layers",),
        vision_tower=("model.vision_tower",),
        # transformers >= 5 builds the SigLIP tower without its vision_model wrapper
        vision_layers=("model.vision_tower.encoder.layers", "model.vision_tower.vision_model.encoder.layers"),
        projector=("model.multi_modal_projector",),
    )

    def image_text(self, processor: Any, has_image: bool, suffix: str | None = None) -> str:
        return ""  # image tokens are inserted as ids in preprocess, before BOS

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
        bos = [tok.bos_token_id] if add_special_tokens else []
        # the prefix ends where the answer starts; without answer starts (a prompt alone, as in
        # generation) it runs through the last line break, where PaliGemma's prompts end
        cuts = answer_starts if answer_starts is not None else [t.rfind("\n") + 1 for t in texts]
        ids, spans, types = [], [], []
        for text, image, cut in zip(texts, images, cuts, strict=True):
            prefix = tok(text[:cut], add_special_tokens=False, return_offsets_mapping=True)
            suffix = tok(text[cut:], add_special_tokens=False, return_offsets_mapping=True)
            lead = [processor.image_token_id] * (processor.image_seq_length if image is not None else 0) + bos
            head = lead + prefix["input_ids"]
            ids.append(head + suffix["input_ids"])
            spans.append(
                [(0, 0)] * len(lead)
                + prefix["offset_mapping"]
                + [(a + cut, b + cut) for a, b in suffix["offset_mapping"]]
            )
            types.append([0] * len(head) + [1] * len(suffix["input_ids"]))
        inputs, offsets = token_inputs(processor, ids, spans, images, padding_side)
        inputs["token_type_ids"] = torch.tensor(pad_rows(types, 0, padding_side))  # (B, T)
        return Encoded(inputs, offsets, [len(t) for t in texts])
