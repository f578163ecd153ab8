"""What a model family decides: how it loads, how a prompt is written, how inputs are built, where parts live.

Everything else (batching, answer spans, scoring, generation) is shared in ``mmke.models.base``.
A family holds no state; ``LVLM`` keeps one instance next to the model and processor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn
from transformers import BatchFeature


@dataclass(frozen=True)
class LayoutSpec:
    """Where a family keeps its parts: candidate paths per role, tried in order.

    ``decoder_layers`` / ``vision_layers`` / ``projector`` / ``qformer`` / ``vision_tower`` are
    paths from the model root; ``mlp`` / ``mlp_parts`` / ``mlp_out`` / ``attention`` are paths
    inside one decoder layer (``mlp_parts``: the MLP's linears, for layers with no MLP block, e.g.
    OPT's fc1 and fc2). An empty tuple means the family has no such part.
    """

    decoder_layers: tuple[str, ...]
    mlp: tuple[str, ...] = ("mlp", "feed_forward", "ffn")
    mlp_parts: tuple[str, ...] = ()
    mlp_out: tuple[str, ...] = ("mlp.down_proj", "mlp.c_proj", "mlp.fc2", "mlp.dense_4h_to_h", "fc2")
    attention: tuple[str, ...] = ("self_attn", "attention", "attn", "self_attention")
    vision_tower: tuple[str, ...] = ()
    vision_layers: tuple[str, ...] = ()
    projector: tuple[str, ...] = ()
    qformer: tuple[str, ...] = ()


@dataclass(frozen=True)
class PromptFormat:
    """How a protocol writes a family's input: the text before the answer, the join, BOS.

    ``template`` has ``{image}`` (the family's image placeholder, then ``image_suffix``; "" where
    the image enters as ids) and ``{prompt}``; None keeps the family's own way (its chat
    template, else its plain format). ``separator`` goes between prompt and target (None: one
    space unless whitespace is there already). ``add_special_tokens``: whether the tokenizer adds
    BOS (None: unless a chat template writes it). ``target_alone``: the labels are the target
    tokenised on its own (no special tokens) at the last positions of the item, instead of its
    tokens in context. ``anchored`` is False where the protocol's code has no format for the
    family and the family's own stands in.
    """

    describe: str
    template: str | None = None
    image_suffix: str = ""
    separator: str | None = None
    add_special_tokens: bool | None = None
    target_alone: bool = False
    anchored: bool = True

    @property
    def labels(self) -> str:
        """What the labels are, in words (a result's provenance)."""
        if self.target_alone:
            return "the target tokenised alone, at the last positions"
        return "the target's tokens in context"


#: The family's own way of writing prompts (mmke's canonical protocol).
OWN_FORMAT = PromptFormat("the family's own: its chat template, else its plain format")


@dataclass
class Encoded:
    """A processed batch before labels: model inputs plus where each token came from in the text.

    ``offsets[b, t]`` is the (start, end) character span of token t in item b's final text (after
    the processor expanded image placeholders); tokens the tokenizer added itself (BOS, padding,
    image query tokens) have an empty span. ``text_lengths[b]`` is the length of that final text,
    so the last ``len(target)`` characters of it are the answer.
    """

    inputs: dict[str, torch.Tensor]
    offsets: torch.Tensor  # (B, T, 2)
    text_lengths: list[int]


class Family:
    """Base family: a processor-driven VLM (one image placeholder per image item, chat template if any).

    Subclasses set the class attributes and override only what differs.
    """

    name: ClassVar[str] = ""
    #: HF ``architectures`` entries and ``model_type`` values this family drives (for inference).
    architectures: ClassVar[tuple[str, ...]] = ()
    model_types: ClassVar[tuple[str, ...]] = ()
    layout_spec: ClassVar[LayoutSpec]
    multimodal: ClassVar[bool] = True
    #: Prompt format when the processor has no chat template; ``{image}`` is the placeholder or "".
    plain_format: ClassVar[str] = "USER: {image}{prompt} ASSISTANT:"
    #: What ``{image}`` expands to in ``plain_format`` (the processor's image token followed by this).
    image_suffix: ClassVar[str] = "\n"
    #: Whether a batch's shared leading tokens can run once and the rest continue from their
    #: cache (``forward(..., cache=)``): decoders whose positions follow the token index.
    reuses_prefix: ClassVar[bool] = False
    #: The family's processor without its video half, for folders whose AutoProcessor would need
    #: torchvision for videos mmke never processes (None: AutoProcessor always).
    image_only_processor: ClassVar[type[Any] | None] = None
    #: Whether the processor takes images as one list per text (Gemma 3's checks each text's
    #: count against its placeholders) instead of one flat list for the batch.
    images_per_text: ClassVar[bool] = False
    #: What joins prompt and target when the bound format has no ``separator`` of its own
    #: (None: one space unless whitespace is there already; "" where the model answers right
    #: after its prompt, e.g. Mistral's ``[/INST]``).
    answer_separator: ClassVar[str | None] = None

    # --- loading --------------------------------------------------------------------------

    def load_processor(self, path: Path) -> Any:
        from transformers import AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        except (ImportError, ValueError, TypeError, OSError) as e:
            if self.image_only_processor is None:
                raise
            first: Exception = e  # e.g. the video processor needs torchvision
        else:
            if self.image_only_processor is None or hasattr(processor, "image_processor"):
                return processor
            first = ValueError("AutoProcessor found no image processor")
        try:
            return self.image_only_processor.from_pretrained(path, local_files_only=True)
        except (ImportError, ValueError, TypeError, OSError):
            raise first from None

    def model_class(self, config: Any) -> type[nn.Module]:
        """The transformers class to instantiate: the config's own architecture when we drive it."""
        import transformers

        for arch in getattr(config, "architectures", None) or ():
            if arch in self.architectures and hasattr(transformers, arch):
                return getattr(transformers, arch)
        return transformers.AutoModelForImageTextToText

    def check_model(self, model: nn.Module) -> None:
        """Refuse, in one line, a loaded model this family cannot drive. The built-in families check
        nothing (their layouts are candidates, tried when a site is asked for); a family declared
        from a file checks that its declared parts exist."""

    # --- prompts --------------------------------------------------------------------------

    def tokenizer(self, processor: Any) -> Any:
        return getattr(processor, "tokenizer", processor)

    def chat_template(self, processor: Any) -> str | None:
        return getattr(processor, "chat_template", None) or getattr(
            self.tokenizer(processor), "chat_template", None
        )

    def image_placeholder(self, processor: Any) -> str:
        return str(processor.image_token)

    def image_token(self, processor: Any) -> str | None:
        """The token that stands for image features in the ids (None for a text-only family)."""
        return str(processor.image_token) if self.multimodal else None

    def image_text(self, processor: Any, has_image: bool, suffix: str | None = None) -> str:
        """What stands for the image in a written prompt ("" when the image enters another way),
        followed by ``suffix`` (default: the family's ``image_suffix``)."""
        if not has_image:
            return ""
        return self.image_placeholder(processor) + (self.image_suffix if suffix is None else suffix)

    def format_prompt(
        self, processor: Any, prompt: str, has_image: bool, fmt: PromptFormat | None = None
    ) -> str:
        """The model's text up to where the answer starts (the assistant turn when there is one).

        ``fmt`` with a template writes it as a paper's code does instead of the family's own way
        (its chat template, else ``plain_format``).
        """
        if fmt is not None and fmt.template is not None:
            image = self.image_text(processor, has_image, fmt.image_suffix)
            return fmt.template.format(image=image, prompt=prompt)
        if self.chat_template(processor):
            return self._templated(processor, prompt, has_image)
        return self.plain_format.format(image=self.image_text(processor, has_image), prompt=prompt)

    def _templated(self, processor: Any, prompt: str, has_image: bool) -> str:
        content: list[dict[str, str]] = [{"type": "image"}] if has_image else []
        content.append({"type": "text", "text": prompt})
        messages = [{"role": "user", "content": content}]
        # explicit template: some checkpoints keep it only on the tokenizer, not the processor
        template = self.chat_template(processor)
        return processor.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, tokenize=False
        )

    # --- inputs ---------------------------------------------------------------------------

    def preprocess(
        self,
        processor: Any,
        texts: list[str],
        images: list[Image.Image | None],
        padding_side: str,
        add_special_tokens: bool,
        answer_starts: Sequence[int] | None = None,
    ) -> Encoded:
        """Tokenise a batch and process its images in one processor call (text-only items mixed in).

        ``answer_starts[b]`` is the character index where item b's target begins in ``texts[b]``
        (None for prompts alone, as in generation); families whose inputs treat prompt and answer
        apart read it, the rest ignore it.
        """
        pixels: list[Any] = [im for im in images if im is not None]
        if pixels and self.images_per_text:  # [[image], [], ...]: [] for a text-only item
            pixels = [[im] if im is not None else [] for im in images]
        # Python lists first: some processors cannot tensorise their own replacement offsets.
        enc = processor(
            text=list(texts),
            images=pixels or None,
            padding=True,
            padding_side=padding_side,
            add_special_tokens=add_special_tokens,
            return_offsets_mapping=True,
            return_text_replacement_offsets=True,
            return_token_type_ids=False,
        )
        offsets = torch.as_tensor(enc.pop("offset_mapping"), dtype=torch.long)  # (B, T, 2)
        replaced = enc.pop("text_replacement_offsets", None) or [[] for _ in texts]
        lengths = [len(t) + _growth(r) for t, r in zip(texts, replaced, strict=True)]
        return Encoded(dict(BatchFeature(dict(enc), tensor_type="pt")), offsets, lengths)

    # --- running --------------------------------------------------------------------------

    def forward(self, model: nn.Module, inputs: dict[str, torch.Tensor], cache: Any = None) -> Any:
        """The model's outputs for ``inputs``; ``cache``: True to return the keys and values of
        these tokens, or a cache of earlier tokens to continue from (families that ``reuses_prefix``)."""
        if cache is None:
            return model(**inputs, use_cache=False)
        if cache is True:
            return model(**inputs, use_cache=True)
        return model(**inputs, cache=cache, use_cache=True)

    def generate(self, model: nn.Module, inputs: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
        """New token ids only, (B, N) (left-padded inputs)."""
        out = model.generate(**inputs, **kwargs)  # (B, T + N)
        return out[:, inputs["input_ids"].shape[1] :]


def _growth(replacements: list[dict[str, Any]]) -> int:
    """How many characters the processor's placeholder expansion added to one text."""
    return sum((r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0]) for r in replacements)


def token_inputs(
    processor: Any,
    rows: list[list[int]],
    spans: list[list[tuple[int, int]]],
    images: list[Image.Image | None],
    side: str,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Model inputs from token rows a family built itself (image ids placed before BOS, which the
    processor's own call cannot do): ``input_ids`` and ``attention_mask`` (B, T) padded on
    ``side``, the batch's ``pixel_values``; and the tokens' character spans (B, T, 2)."""
    inputs = {
        "input_ids": torch.tensor(pad_rows(rows, processor.tokenizer.pad_token_id, side)),  # (B, T)
        "attention_mask": torch.tensor(pad_rows([[1] * len(r) for r in rows], 0, side)),  # (B, T)
    }
    pixels = [im for im in images if im is not None]
    if pixels:
        inputs["pixel_values"] = processor.image_processor(pixels, return_tensors="pt")["pixel_values"]
    return inputs, torch.tensor(pad_rows(spans, (0, 0), side))  # (B, T, 2)


def pad_rows(rows: list[list[Any]], value: Any, side: str) -> list[list[Any]]:
    """Pad ragged rows to one length on the given side."""
    width = max(len(r) for r in rows)
    if side == "left":
        return [[value] * (width - len(r)) + r for r in rows]
    return [r + [value] * (width - len(r)) for r in rows]
