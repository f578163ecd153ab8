"""Tiny randomly initialised models of the real transformers classes, built offline in code (for tests).

Each has 2 decoder layers of width 64, a 2-layer vision tower on 32x32 images, a byte-level BPE
tokenizer trained here on a fixed corpus (so " paris" and "paris" are different ids, as in
OPT/Qwen/GPT-2) and the family's real processor with its PIL image processor (no torchvision).
``tiny_model(kind, seed)`` is deterministic; ``save_tiny`` writes one in HF format so
``LVLM.load(dir)`` goes through the real ``from_pretrained`` path.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from torch import nn
from transformers import PreTrainedTokenizerFast

from mmke.models.base import LVLM

#: Every tiny model that can be built; "qwen2_5_vl" is a Qwen2.5-VL model driven by family qwen2_vl.
TINY_KINDS = (
    "llava",
    "llava_next",
    "llava_onevision",
    "internvl",
    "gemma3",
    "mistral3",
    "paligemma",
    "blip2",
    "instructblip",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "idefics3",
    "causal_lm",
)

_CORPUS = (
    "paris is the capital of france",
    "the capital of france is paris",
    "rome is the capital of italy and paris is in france",
    "london is a city in england",
    "what is the colour of the sign in the picture",
    "the sign is red and the sky is blue",
    "who painted this picture of a red square",
    "question answer user assistant image",
)

_WIDTH = 64
_IMAGE = 32

# Qwen2-VL's chat template, reduced to the parts a single-turn prompt uses.
_QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_model(kind: str, seed: int = 0) -> LVLM:
    """A tiny random model of ``kind`` (one of ``TINY_KINDS``), identical for the same seed."""
    builders: dict[str, Callable[[int], LVLM]] = {
        "llava": _llava,
        "llava_next": _llava_next,
        "llava_onevision": _llava_onevision,
        "internvl": _internvl,
        "gemma3": _gemma3,
        "mistral3": _mistral3,
        "paligemma": _paligemma,
        "blip2": _blip2,
        "instructblip": _instructblip,
        "qwen2_vl": _qwen2_vl,
        "qwen2_5_vl": _qwen2_5_vl,
        "qwen3_vl": _qwen3_vl,
        "idefics3": _idefics3,
        "causal_lm": _causal_lm,
    }
    if kind not in builders:
        raise ValueError(f"no tiny model {kind!r}; known: {', '.join(TINY_KINDS)}")
    return builders[kind](seed)


def save_tiny(model: LVLM, path: str | Path) -> Path:
    """Write weights, config and processor/tokenizer in HF format (what ``LVLM.load`` reads)."""
    path = Path(path)
    model.model.save_pretrained(path)
    model.processor.save_pretrained(path)
    return path


# --- tokenizers ---------------------------------------------------------------------------


def bpe_tokenizer(
    specials: list[str],
    bos: str | None = "<s>",
    eos: str = "</s>",
    pad: str = "<pad>",
    named: dict[str, str] | None = None,
) -> Any:
    """A byte-level BPE trained on a fixed corpus, wrapped as a fast HF tokenizer.

    ``specials`` become special tokens; BOS (when given) is prepended by the post-processor.
    ``named`` special tokens are also attributes of the tokenizer (``tok.start_image_token`` and
    ``tok.start_image_token_id``), where a processor reads them from (InternVL's).
    """
    named = named or {}
    specials = [*specials, *(t for t in named.values() if t not in specials)]
    names = [t for t in (bos, eos, pad) if t] + [s for s in specials if s not in (bos, eos, pad)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=names,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS) * 10, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    extra = ({"image_token": "<image>"} if "<image>" in specials else {}) | named
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, extra_special_tokens=extra
    )


def wordpiece_tokenizer() -> Any:
    """A lower-casing WordPiece trained on the fixed corpus that writes ``[CLS] text [SEP]``, as
    BERT's (InstructBLIP's Q-Former tokenizer is bert-base-uncased)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    alphabet = list(string.ascii_lowercase + string.digits + string.punctuation)
    trainer = trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(list(_CORPUS) * 10, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def _llama_text(tok: Any, **overrides: Any) -> dict[str, Any]:
    cfg = {
        "model_type": "llama",
        "vocab_size": len(tok),
        "hidden_size": _WIDTH,
        "intermediate_size": 2 * _WIDTH,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "initializer_range": 0.2,  # wide logits: no near-ties for argmax comparisons in tests
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    return cfg | overrides


def _build(cls: type[nn.Module], config: Any, seed: int) -> nn.Module:
    with torch.random.fork_rng():  # leave the caller's RNG as it was
        torch.manual_seed(seed)
        return cls(config).eval()


# --- families -----------------------------------------------------------------------------


def _llava(seed: int) -> LVLM:
    from mmke.models._construct import llava_from_sizes

    tok = bpe_tokenizer(["<image>"])
    text = _llama_text(tok)
    for key in ("model_type", "vocab_size", "pad_token_id", "bos_token_id", "eos_token_id"):
        text.pop(key)
    vision = {k: v for k, v in _vit().items() if k != "image_size"} | {"projection_dim": 32}
    return llava_from_sizes(tok, vision, text, _IMAGE, seed)


#: anyres (LLaVA-NeXT, -OneVision): a base view plus the tiles of the best of these grids.
ANYRES_GRIDS = [[_IMAGE, _IMAGE], [_IMAGE, 2 * _IMAGE], [2 * _IMAGE, _IMAGE]]


def _llava_next(seed: int) -> LVLM:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = bpe_tokenizer(["<image>"])
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": _IMAGE},
        crop_size={"height": _IMAGE, "width": _IMAGE},
        image_grid_pinpoints=ANYRES_GRIDS,
    )
    processor = LlavaNextProcessor(
        image_processor,
        tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    text = _llama_text(tok)
    text.pop("model_type")
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**_vit(), projection_dim=32),
        text_config=LlamaConfig(**text),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=ANYRES_GRIDS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        pad_token_id=tok.pad_token_id,
    )
    return LVLM(_build(LlavaNextForConditionalGeneration, config, seed), processor, "llava_next")


def _llava_onevision(seed: int) -> LVLM:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from mmke.models.families.llava import ImageOnlyLlavaOnevisionProcessor

    tok = bpe_tokenizer(["<image>", "<video>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>")
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": _IMAGE, "width": _IMAGE}, image_grid_pinpoints=ANYRES_GRIDS
    )
    # ChatML with the image as OneVision's own placeholder
    template = _QWEN_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>")
    processor = ImageOnlyLlavaOnevisionProcessor(
        image_processor,
        tok,
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        chat_template=template,
    )
    text = _llama_text(tok, bos_token_id=None)
    text.pop("model_type")
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**_vit()),
        text_config=Qwen2Config(**text),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        video_token_id=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=ANYRES_GRIDS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    return LVLM(_build(LlavaOnevisionForConditionalGeneration, config, seed), processor, "llava_onevision")


def _internvl(seed: int) -> LVLM:
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from mmke.models.families.internvl import ImageOnlyInternVLProcessor

    image_tokens = {"start_image_token": "<img>", "end_image_token": "</img>"}
    image_tokens |= {"context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
    tok = bpe_tokenizer(["<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>", named=image_tokens)
    # a wide image is cut into up to 3 tiles of 32x32 plus a thumbnail, as InternVL tiles
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": _IMAGE, "width": _IMAGE}, crop_to_patches=True, max_patches=3
    )
    template = _QWEN_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>\n")
    # (32 / 8)^2 = 16 patches per tile, pixel-shuffled by 0.5 -> 4 context tokens
    processor = ImageOnlyInternVLProcessor(image_processor, tok, image_seq_length=4, chat_template=template)
    config = InternVLConfig(
        vision_config=_vit(),
        text_config=_llama_text(tok, model_type="qwen2", bos_token_id=None),
        image_token_id=tok.context_image_token_id,
        image_seq_length=4,
        downsample_ratio=0.5,
    )
    return LVLM(_build(InternVLForConditionalGeneration, config, seed), processor, "internvl")


# Gemma 3's chat template, reduced to the parts a single-turn prompt uses.
_GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _gemma3(seed: int) -> LVLM:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    image_tokens = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    image_tokens |= {"image_token": "<image_soft_token>"}
    tok = bpe_tokenizer(["<start_of_turn>", "<end_of_turn>"], bos="<bos>", eos="<eos>", named=image_tokens)
    image_processor = Gemma3ImageProcessorPil(size={"height": _IMAGE, "width": _IMAGE})
    # (32 / 8)^2 = 16 patches, average-pooled 2x2 -> 4 soft tokens
    processor = Gemma3Processor(image_processor, tok, chat_template=_GEMMA_TEMPLATE, image_seq_length=4)
    # a local window shorter than most prompts, so its masks are exercised
    text = _llama_text(tok, head_dim=16, query_pre_attn_scalar=16, sliding_window=16)
    text.pop("model_type")
    config = Gemma3Config(
        vision_config=_vit() | {"model_type": "siglip_vision_model", "vision_use_head": False},
        text_config=text | {"layer_types": ["sliding_attention", "full_attention"]},
        mm_tokens_per_image=4,
        boi_token_index=tok.boi_token_id,
        eoi_token_index=tok.eoi_token_id,
        image_token_index=tok.image_token_id,
    )
    model = _build(Gemma3ForConditionalGeneration, config, seed)
    # Gemma 3 initialises its image projection to zeros: left so, a random model would be blind to
    # images and the vision tower would get no gradient
    with torch.no_grad():
        weight = model.model.multi_modal_projector.mm_input_projection_weight
        weight.normal_(std=0.2, generator=torch.Generator().manual_seed(seed))
    return LVLM(model, processor, "gemma3")


# Mistral Small 3.1's chat template, reduced to the parts a single-turn prompt uses.
_MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST]"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}[IMG]"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}[/INST]"
    "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def _mistral3(seed: int) -> LVLM:
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    from mmke.models.families.mistral3 import PilPixtralProcessor

    specials = ["[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    tok = bpe_tokenizer(specials)
    image_processor = PixtralImageProcessorPil(size={"longest_edge": _IMAGE}, patch_size=8)
    # 32x32 -> 4x4 patches of 8 px, merged 2x2 -> 2 rows of 2 [IMG] tokens
    processor = PilPixtralProcessor(
        image_processor, tok, patch_size=8, spatial_merge_size=2, chat_template=_MISTRAL_TEMPLATE
    )
    vision = _vit() | {"model_type": "pixtral", "head_dim": 16}
    text = _llama_text(tok, model_type="mistral", head_dim=16)
    config = Mistral3Config(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
    )
    return LVLM(_build(Mistral3ForConditionalGeneration, config, seed), processor, "mistral3")


def _paligemma(seed: int) -> LVLM:
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = bpe_tokenizer(["<image>"], bos="<bos>", eos="<eos>")
    # (32 / 8)^2 = 16 patches, each one image token (no pooling)
    image_processor = SiglipImageProcessorPil(size={"height": _IMAGE, "width": _IMAGE}, image_seq_length=16)
    processor = PaliGemmaProcessor(image_processor, tok)  # adds PaliGemma's <loc>/<seg> tokens
    # PaliGemma 2's Gemma 2 decoder: local and global layers, soft-capped logits
    text = _llama_text(tok, model_type="gemma2", head_dim=16, query_pre_attn_scalar=16, sliding_window=16)
    config = PaliGemmaConfig(
        vision_config=_vit() | {"model_type": "siglip_vision_model", "vision_use_head": False},
        text_config=text,
        image_token_index=processor.image_token_id,
        vocab_size=len(tok),
        projection_dim=_WIDTH,
        hidden_size=_WIDTH,
    )
    return LVLM(_build(PaliGemmaForConditionalGeneration, config, seed), processor, "paligemma")


def _blip2(seed: int) -> LVLM:
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        OPTConfig,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tok = bpe_tokenizer(["<image>"])
    n_query = 4
    processor = Blip2Processor(
        BlipImageProcessorPil(size={"height": _IMAGE, "width": _IMAGE}), tok, num_query_tokens=n_query
    )
    opt = OPTConfig(
        vocab_size=len(tok),
        hidden_size=_WIDTH,
        ffn_dim=2 * _WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        word_embed_proj_dim=_WIDTH,
        init_std=0.2,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    config = Blip2Config(
        vision_config=Blip2VisionConfig(**_vit(), initializer_range=0.02),
        qformer_config=Blip2QFormerConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            encoder_hidden_size=32,
        ),
        text_config=opt,
        num_query_tokens=n_query,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    return LVLM(_build(Blip2ForConditionalGeneration, config, seed), processor, "blip2")


def _instructblip(seed: int) -> LVLM:
    from transformers import (
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tok = bpe_tokenizer(["<image>"])
    qformer_tok = wordpiece_tokenizer()
    n_query = 4
    image_processor = BlipImageProcessorPil(size={"height": _IMAGE, "width": _IMAGE})
    processor = InstructBlipProcessor(image_processor, tok, qformer_tok, num_query_tokens=n_query)
    config = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(**_vit(), initializer_range=0.02),
        qformer_config=InstructBlipQFormerConfig(
            vocab_size=len(qformer_tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            pad_token_id=qformer_tok.pad_token_id,
            # wide enough that the image moves the answer (at 0.02 an FT-Vis edit barely reaches it)
            initializer_range=0.2,
        ),
        text_config=_llama_text(tok),  # the Vicuna releases' decoder
        num_query_tokens=n_query,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    return LVLM(_build(InstructBlipForConditionalGeneration, config, seed), processor, "instructblip")


def _qwen_processor() -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from mmke.models.families.qwen2_vl import ImageOnlyQwen2VLProcessor

    specials = [
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    tok = bpe_tokenizer(specials, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    # 32x32 images -> 8x8 patches of 4 px -> 16 image tokens after the 2x2 merge
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=4,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": 16 * 16, "longest_edge": _IMAGE**2},
    )
    return ImageOnlyQwen2VLProcessor(image_processor, tok, chat_template=_QWEN_TEMPLATE)


def _qwen_ids(tok: Any) -> dict[str, int]:
    names = {"image": "<|image_pad|>", "video": "<|video_pad|>", "vision_start": "<|vision_start|>"}
    ids = {f"{k}_token_id": tok.convert_tokens_to_ids(v) for k, v in names.items()}
    return ids | {"vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>")}


def _qwen_text(tok: Any) -> dict[str, Any]:
    text = _llama_text(tok, bos_token_id=None)
    text.pop("model_type")
    # head_dim 16 -> 8 rotary frequencies split over (temporal, height, width)
    return text | {
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    }


def _qwen2_vl(seed: int) -> LVLM:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    processor = _qwen_processor()
    tok = processor.tokenizer
    vision = {"depth": 2, "embed_dim": 32, "hidden_size": _WIDTH, "num_heads": 2, "mlp_ratio": 2}
    vision |= {"patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2}
    config = Qwen2VLConfig(text_config=_qwen_text(tok), vision_config=vision, **_qwen_ids(tok))
    return LVLM(_build(Qwen2VLForConditionalGeneration, config, seed), processor, "qwen2_vl")


def _qwen2_5_vl(seed: int) -> LVLM:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    processor = _qwen_processor()
    tok = processor.tokenizer
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": _WIDTH,
    }
    vision |= {"patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2}
    vision |= {"window_size": 16, "fullatt_block_indexes": [1]}
    config = Qwen2_5_VLConfig(text_config=_qwen_text(tok), vision_config=vision, **_qwen_ids(tok))
    return LVLM(_build(Qwen2_5_VLForConditionalGeneration, config, seed), processor, "qwen2_vl")


def _qwen3_vl(seed: int) -> LVLM:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from mmke.models.families.qwen2_vl import Qwen3VL

    qwen2 = _qwen_processor()
    processor = Qwen3VL.image_only_processor(qwen2.image_processor, qwen2.tokenizer, qwen2.chat_template)
    tok = processor.tokenizer
    text = _qwen_text(tok)
    text["rope_parameters"] |= {"mrope_interleaved": True}
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": _WIDTH,
    }
    vision |= {"patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2}
    vision |= {"deepstack_visual_indexes": [1], "num_position_embeddings": 64}
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **_qwen_ids(tok))
    return LVLM(_build(Qwen3VLForConditionalGeneration, config, seed), processor, "qwen3_vl")


def _idefics3(seed: int) -> LVLM:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    specials = ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<|im_start|>"]
    tok = bpe_tokenizer(specials)
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": _IMAGE}, max_image_size={"longest_edge": _IMAGE}, do_image_splitting=False
    )
    # (32 / 8)^2 = 16 patches, pixel-shuffled by 2 -> 4 image tokens
    processor = Idefics3Processor(image_processor, tok, image_seq_len=4)
    config = Idefics3Config(
        vision_config=_vit(),
        text_config=_llama_text(tok),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        pad_token_id=tok.pad_token_id,
    )
    return LVLM(_build(Idefics3ForConditionalGeneration, config, seed), processor, "idefics3")


def _causal_lm(seed: int) -> LVLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = bpe_tokenizer([])
    text = _llama_text(tok)
    text.pop("model_type")
    return LVLM(_build(LlamaForCausalLM, LlamaConfig(**text), seed), tok, "causal_lm")


def _vit() -> dict[str, Any]:
    """A 2-layer ViT of width 32 on 32x32 images in 8x8 patches."""
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": _IMAGE,
        "patch_size": 8,
    }
