"""Mistral 3 (Mistral3ForConditionalGeneration): Pixtral vision encoder, patch merger + MLP projector,
Mistral decoder.

Paper: Agrawal et al., "Pixtral 12B", 2024 (the vision encoder and its image tokens); Mistral AI,
"Mistral Small 3.1" (release note), 2025. Prompts go through the chat template
(``[INST][IMG]{prompt}[/INST]``); the processor expands ``[IMG]`` to one row of ``[IMG]`` tokens per
row of merged patches, each row ended by ``[IMG_BREAK]`` and the last by ``[IMG_END]``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

from transformers import ProcessorMixin

from mmke.models.families.llava import Llava
from mmke.registry import register_family


class PilPixtralProcessor(ProcessorMixin):
    """Pixtral's processor (``PixtralProcessor``) for PIL images, without torchvision.

    transformers' own cannot be imported without torchvision: its module imports the torchvision
    image processor for a token count mmke never asks for. This one has its signature, defaults
    and image-token expansion, and saves as ``PixtralProcessor``; the name keeps the tokenizer
    loading ProcessorMixin gives Pixtral (it matches ``"PixtralProcessor"`` in the class name).
    """

    text_kwargs: ClassVar[dict[str, Any]] = {"return_tensors": "pt"}
    images_kwargs: ClassVar[dict[str, Any]] = {"return_tensors": "pt"}

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        patch_size: int = 16,
        spatial_merge_size: int = 1,
        chat_template: str | None = None,
        image_token: str = "[IMG]",
        image_break_token: str = "[IMG_BREAK]",
        image_end_token: str = "[IMG_END]",
        **kwargs: Any,
    ):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.patch_size = patch_size
        self.spatial_merge_size = spatial_merge_size
        self.image_token = image_token
        self.image_break_token = image_break_token
        self.image_end_token = image_end_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)

    def _process_images(self, images: Any, **images_kwargs: Any) -> Any:
        # images are resized to whole merged patches
        images_kwargs["patch_size"] = self.patch_size * self.spatial_merge_size
        return super()._process_images(images, **images_kwargs)

    def replace_image_token(self, image_inputs: dict[str, Any], image_idx: int, **kwargs: Any) -> str:
        step = self.patch_size * self.spatial_merge_size
        height, width = image_inputs["image_sizes"][image_idx]
        rows = [self.image_token * (width // step) + self.image_break_token] * (height // step)
        return "".join(rows)[: -len(self.image_break_token)] + self.image_end_token

    @property
    def model_input_names(self) -> list[str]:
        return self.tokenizer.model_input_names + self.image_processor.model_input_names + ["image_sizes"]

    def to_dict(self) -> dict[str, Any]:
        return super().to_dict() | {"processor_class": "PixtralProcessor"}


@register_family("mistral3")
class Mistral3(Llava):
    """Mistral 3 (Mistral Small 3.1): Pixtral encoder, patch merger + MLP projector, Mistral decoder.

    What differs from LLaVA: the vision layers' path, the ``[INST]`` format when a folder has no
    chat template, the answer right after ``[/INST]`` (no space, as the chat template writes an
    assistant turn), and a PIL stand-in for Pixtral's processor, which needs torchvision. Positions
    follow the tokens (the 2-D RoPE is inside the vision encoder), so a shared prefix is reused.
    Paper: Agrawal et al., "Pixtral 12B", 2024.
    """

    name = "mistral3"
    architectures = ("Mistral3ForConditionalGeneration",)
    model_types = ("mistral3",)
    image_only_processor = PilPixtralProcessor
    plain_format = "[INST]{image}{prompt}[/INST]"
    image_suffix = ""
    answer_separator = ""
    layout_spec = replace(Llava.layout_spec, vision_layers=("model.vision_tower.transformer.layers",))
