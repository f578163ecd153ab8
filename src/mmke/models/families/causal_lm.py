"""Any text-only causal language model (AutoModelForCausalLM): the LLM half of editing, no images.

Prompts use the tokenizer's chat template when it has one, else the bare prompt with the target
after a single space (the convention of ROME/MEMIT and EasyEdit's text editing).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from torch import nn

from mmke.models.families._base import Encoded, Family, LayoutSpec, PromptFormat
from mmke.registry import model_families, register_family


def _causal_model_types() -> tuple[str, ...]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return tuple(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _multimodal_model_types() -> set[str]:
    """The model types a multimodal family drives (transformers also maps some of them, e.g.
    ``gemma3``, to a causal-LM class)."""
    families = (model_families.get(n) for n in model_families.names())
    return {t for fam in families if fam.multimodal for t in fam.model_types}


@register_family("causal_lm")
class CausalLM(Family):
    """A text-only decoder (Llama, Qwen2, SmolLM2, GPT-2, OPT, ...); image items are an error."""

    name = "causal_lm"
    reuses_prefix = True
    multimodal = False
    plain_format = "{prompt}"
    layout_spec = LayoutSpec(
        decoder_layers=(
            "model.layers",
            "model.decoder.layers",
            "transformer.h",
            "gpt_neox.layers",
            "model.language_model.layers",
        ),
    )

    @property
    def model_types(self) -> tuple[str, ...]:  # type: ignore[override]
        # transformers' own table of causal-LM model types, less those a multimodal family drives:
        # every other one is text-only here
        claimed = _multimodal_model_types()
        return tuple(t for t in _causal_model_types() if t not in claimed)

    def load_processor(self, path: Path) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)

    def model_class(self, config: Any) -> type[nn.Module]:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def image_text(self, processor: Any, has_image: bool, suffix: str | None = None) -> str:
        return ""

    def format_prompt(
        self, processor: Any, prompt: str, has_image: bool, fmt: PromptFormat | None = None
    ) -> str:
        if (fmt is None or fmt.template is None) and self.chat_template(processor):
            messages = [{"role": "user", "content": prompt}]
            return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return super().format_prompt(processor, prompt, has_image, fmt)

    def preprocess(
        self,
        processor: Any,
        texts: list[str],
        images: list[Image.Image | None],
        padding_side: str,
        add_special_tokens: bool,
        answer_starts: Sequence[int] | None = None,
    ) -> Encoded:
        enc = processor(
            list(texts),
            padding=True,
            padding_side=padding_side,
            add_special_tokens=add_special_tokens,
            return_offsets_mapping=True,
            return_token_type_ids=False,
            return_tensors="pt",
        )
        offsets = enc.pop("offset_mapping")  # (B, T, 2)
        return Encoded(dict(enc), offsets, [len(t) for t in texts])
