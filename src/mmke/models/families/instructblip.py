"""InstructBLIP (InstructBlipForConditionalGeneration with OPT or LLaMA/Vicuna): BLIP-2 whose
Q-Former also reads the instruction.

Paper: Dai et al., "InstructBLIP: Towards General-purpose Vision-Language Models with Instruction
Tuning", NeurIPS 2023. The language side is BLIP-2's (query tokens before BOS, then the bare
prompt); the Q-Former gets ``qformer_input_ids`` of the instruction alone (the text before the
answer), tokenised by its own BERT tokenizer, one row per image, as LAVIS's
``blip2_vicuna_instruct`` builds them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from mmke.models.families._base import Encoded, pad_rows
from mmke.models.families.blip2 import Blip2
from mmke.registry import register_family

#: The most Q-Former text tokens: LAVIS's ``max_txt_len``, truncated on the left (its tokenizer's
#: ``truncation_side``), so a long prompt (IKE's demonstrations) keeps its end, the question.
QFORMER_MAX_TOKENS = 128


@register_family("instructblip")
class InstructBlip(Blip2):
    """InstructBLIP: BLIP-2's layout and language inputs, plus the instruction-aware Q-Former.

    What differs from BLIP-2: the Q-Former's text input (the instruction only, so the answer never
    reaches the query outputs that precede it). Paper: Dai et al., "InstructBLIP", NeurIPS 2023.
    """

    name = "instructblip"
    architectures = ("InstructBlipForConditionalGeneration",)
    model_types = ("instructblip",)

    def preprocess(
        self,
        processor: Any,
        texts: list[str],
        images: list[Image.Image | None],
        padding_side: str,
        add_special_tokens: bool,
        answer_starts: Sequence[int] | None = None,
    ) -> Encoded:
        enc = super().preprocess(processor, texts, images, padding_side, add_special_tokens, answer_starts)
        starts = answer_starts if answer_starts is not None else [len(t) for t in texts]
        # the model runs the Q-Former once per image (rows line up with pixel_values), text items have none
        prompts = [t[:s] for t, s, im in zip(texts, starts, images, strict=True) if im is not None]
        if prompts:
            enc.inputs |= qformer_inputs(processor.qformer_tokenizer, prompts)
        return enc


def qformer_inputs(tokenizer: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
    """``qformer_input_ids`` and ``qformer_attention_mask`` (N, L) of ``prompts``, right-padded
    (the Q-Former's positions count from 0, so each row is as it is alone)."""
    rows = [_left_truncated(tokenizer, p) for p in prompts]
    return {
        "qformer_input_ids": torch.tensor(pad_rows(rows, tokenizer.pad_token_id, "right")),  # (N, L)
        "qformer_attention_mask": torch.tensor(pad_rows([[1] * len(r) for r in rows], 0, "right")),  # (N, L)
    }


def _left_truncated(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's ids with the tokenizer's special tokens ([CLS] ... [SEP]), at most
    ``QFORMER_MAX_TOKENS``: the text's first tokens go, the special tokens stay."""
    enc = tokenizer(prompt, return_special_tokens_mask=True)
    ids, special = list(enc["input_ids"]), list(enc["special_tokens_mask"])
    if len(ids) <= QFORMER_MAX_TOKENS:
        return ids
    head = special.index(0)  # the leading special tokens
    tail = tokenizer.num_special_tokens_to_add(pair=False) - head  # the trailing ones
    keep = QFORMER_MAX_TOKENS - head - tail  # the text's last tokens
    return ids[:head] + ids[len(ids) - tail - keep :]
