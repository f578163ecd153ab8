"""The world model before training: a word-level tokenizer over the world's words and a small LLaVA."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmke.bundled.spec import WorldModelSpec
from mmke.models._construct import llava_from_sizes
from mmke.models.base import LVLM

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
#: Words of the llava family's plain prompt format, which the world's own texts do not contain.
FORMAT_WORDS = "USER: ASSISTANT:"


def world_texts(world: Path) -> Iterable[str]:
    """The world's words (``vocab.txt``: its corpus, checks and cases) and the prompt format's."""
    yield FORMAT_WORDS
    yield from (world / "vocab.txt").read_text(encoding="utf-8").split()


def build_tokenizer(texts: Iterable[str]) -> Any:
    """A lower-cased word-level tokenizer (words and punctuation) over ``texts``, ids in sorted order."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    norm, split = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    words: set[str] = set()
    for text in texts:
        words.update(w for w, _ in split.pre_tokenize_str(norm.normalize_str(text)))
    vocab = {w: i for i, w in enumerate([*SPECIALS, *sorted(words - set(SPECIALS))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = norm, split
    bos = [("<s>", vocab["<s>"])]
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=bos)
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces and tidies punctuation
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
        model_input_names=["input_ids", "attention_mask"],
    )


def build_untrained(spec: WorldModelSpec, tokenizer: Any) -> LVLM:
    vision = {
        "hidden_size": spec.vision_hidden,
        "intermediate_size": 4 * spec.vision_hidden,
        "num_hidden_layers": spec.vision_layers,
        "num_attention_heads": spec.vision_heads,
        "patch_size": spec.patch_size,
        "projection_dim": spec.vision_hidden,
    }
    text = {
        "hidden_size": spec.text_hidden,
        "intermediate_size": spec.text_intermediate,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads,
        "num_key_value_heads": spec.text_heads,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }
    return llava_from_sizes(tokenizer, vision, text, spec.image_size, spec.seed)
