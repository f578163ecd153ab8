"""Gemma 3 (Gemma3ForConditionalGeneration): SigLIP encoder, pooled linear projector, Gemma 3 decoder.

Paper: Gemma Team, "Gemma 3 Technical Report", 2025. Prompts go through the chat template
(``<start_of_turn>user\\n<start_of_image>{prompt}<end_of_turn>\\n<start_of_turn>model\\n``); the
processor expands ``<start_of_image>`` to the image's soft tokens and marks them in
``token_type_ids``, which the model needs: image tokens attend to each other both ways.
"""

from __future__ import annotations

from typing import Any

from mmke.models.families._base import Family, LayoutSpec
from mmke.registry import register_family


@register_family("gemma3")
class Gemma3(Family):
    """Gemma 3 (4B/12B/27B): SigLIP tower, pooled projector, decoder with local/global attention.

    The image in a written prompt is ``<start_of_image>``; in the ids it is ``<image_soft_token>``.
    No prefix reuse: the processor's ``token_type_ids`` run along the tokens (the shared prefix
    would need them cut with the ids). Paper: Gemma Team, "Gemma 3 Technical Report", 2025.
    """

    name = "gemma3"
    images_per_text = True
    architectures = ("Gemma3ForConditionalGeneration",)
    model_types = ("gemma3",)
    # pretrained checkpoints take the bare prompt after the image (BOS added by the tokenizer)
    plain_format = "{image}{prompt}"
    image_suffix = ""
    layout_spec = LayoutSpec(
        decoder_layers=("model.language_model.layers",),
        vision_tower=("model.vision_tower",),
        # transformers >= 5 builds the SigLIP tower without its vision_model wrapper
        vision_layers=("model.vision_tower.encoder.layers", "model.vision_tower.vision_model.encoder.layers"),
        projector=("model.multi_modal_projector",),
    )

    def image_token(self, processor: Any) -> str | None:
        return str(processor.tokenizer.image_token)  # the processor's image_token is the placeholder
