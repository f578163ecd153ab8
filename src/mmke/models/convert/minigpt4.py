"""MiniGPT-4 (EVA ViT-g + BLIP-2 Q-Former + ``llama_proj`` + Vicuna) -> Blip2ForConditionalGeneration.

Paper: Zhu et al., "MiniGPT-4: Enhancing Vision-Language Understanding with Advanced Large
Language Models", ICLR 2024. Read from Vision-CAIR/MiniGPT-4: minigpt4/models/minigpt4.py
(init_Qformer, encode_img, llama_proj), minigpt_base.py (prompt split at ``<ImageHere>``, BOS on
the first segment), base_model.py (load_from_pretrained reads ``checkpoint["model"]``),
eva_vit.py (create_eva_vit_g), Qformer.py, eval_configs/minigpt4_eval.yaml (prompt template);
and from salesforce/LAVIS runners/runner_base.py (_save_checkpoint keeps only trained weights).

SRC layout (the files MiniGPT-4's own loader reads, in the order it loads them; a later file
replaces what an earlier one gave, as ``load_state_dict(strict=False)`` does there)::

    SRC/eva_vit_g.pth                     EVA ViT-g state dict (create_eva_vit_g downloads it)
    SRC/blip2_pretrained_flant5xxl.pth    LAVIS BLIP-2 checkpoint {"model": ...}: ln_vision, Q-Former,
                                          query_tokens (``q_former_model`` in MiniGPT-4's config)
    SRC/pretrained_minigpt4*.pth          MiniGPT-4's checkpoint {"model": {llama_proj.*}} (``ckpt``)
    SRC/vicuna/                           the Vicuna (LLaMA) HF folder: config.json, weights, tokenizer
    SRC/sizes.json                        optional: other sizes than MiniGPT-4's (see ``Sizes``)

MiniGPT-4's LLaMA-2 variant (minigpt4_llama2.yaml: has_qformer False, ``[INST]`` prompts) is not
a BLIP-2 model and is not converted: its ``llama_proj`` fails the shape check.

The image's 32 query outputs enter the decoder where MiniGPT-4 splices them, inside
``<Img>...</Img>``: the saved chat template writes the image tokens there and the processor adds
none of its own (``num_query_tokens=0``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmke.models.convert._common import (
    IMAGE_TOKEN,
    add_image_token,
    causal_lm_table,
    chat_template,
    text_config,
    weights_dtype,
)
from mmke.models.convert._files import (
    checkpoint_file,
    find_file,
    find_folder,
    folder_weights,
    load_tokenizer,
    read_json,
)
from mmke.models.convert._mapping import ConversionError, Drop, Entry, Rule, Source, rename
from mmke.models.convert._write import Conversion, Target
from mmke.registry import register_checkpoint_kind

#: EVA ViT-g as create_eva_vit_g builds it (eva_vit.py): 39 of EVA-CLIP's 40 blocks, width 1408,
#: 1408 // 88 = 16 heads, MLP int(1408 * 4.3637) = 6144, LayerNorm eps 1e-6, exact GELU, q/v biases,
#: 224 px images in 14 px patches (minigpt4_vicuna0.yaml: image_size 224).
EVA_VIT_G: dict[str, Any] = {
    "hidden_size": 1408,
    "intermediate_size": 6144,
    "num_hidden_layers": 39,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu",
    "qkv_bias": True,
}
#: The Q-Former: bert-base-uncased's BertConfig (init_Qformer) with cross-attention every 2nd layer.
QFORMER_BERT_BASE: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
    "max_position_embeddings": 512,
    "cross_attention_frequency": 2,
}


@dataclass(frozen=True)
class Sizes:
    """The vision encoder's and Q-Former's sizes and the query count: MiniGPT-4's own by default.

    ``SRC/sizes.json`` may replace any of them (``{"vision": {...}, "qformer": {...},
    "num_query_tokens": n}``, keys as in ``EVA_VIT_G`` / ``QFORMER_BERT_BASE``), for a variant
    built with other sizes; the shape check then holds the files to those sizes.
    """

    vision: Mapping[str, Any] = field(default_factory=lambda: dict(EVA_VIT_G))
    qformer: Mapping[str, Any] = field(default_factory=lambda: dict(QFORMER_BERT_BASE))
    num_query_tokens: int = 32  # minigpt4_vicuna0.yaml: num_query_token

    @classmethod
    def read(cls, src: Path) -> Sizes:
        path = src / "sizes.json"
        if not path.is_file():
            return cls()
        raw = read_json(path, src)
        unknown = set(raw) - {"vision", "qformer", "num_query_tokens"}
        if unknown:
            raise ConversionError(
                f"sizes.json: unknown key {sorted(unknown)[0]!r} (vision, qformer, num_query_tokens)"
            )
        return cls(
            vision=_overridden(EVA_VIT_G, raw.get("vision", {}), "vision"),
            qformer=_overridden(QFORMER_BERT_BASE, raw.get("qformer", {}), "qformer"),
            num_query_tokens=int(raw.get("num_query_tokens", 32)),
        )


def _overridden(defaults: Mapping[str, Any], given: Any, where: str) -> dict[str, Any]:
    if not isinstance(given, dict):
        raise ConversionError(f"sizes.json: {where!r} must be an object")
    unknown = set(given) - set(defaults)
    if unknown:
        raise ConversionError(
            f"sizes.json: unknown {where} size {sorted(unknown)[0]!r} (known: {', '.join(defaults)})"
        )
    return {**defaults, **given}


def _eva_qkv_bias(parts: Sequence[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """EVA's attention bias: q_bias, zeros for the keys, v_bias (eva_vit.py Attention.forward)."""
    q, v = parts  # (D,), (D,)
    return torch.cat([q, torch.zeros_like(v), v])  # (3D,)


def eva_table(prefix: str, depth: int) -> tuple[Entry, ...]:
    """EVA ViT-g keys (eva_vit.py VisionTransformer) under ``prefix`` -> Blip2VisionModel."""
    p, v = prefix, "vision_model."
    layer = v + "encoder.layers.{i}."
    return (
        Drop(
            p + "blocks.{i}.{rest:path}",
            f"EVA-CLIP blocks past the {depth} create_eva_vit_g builds (BLIP-2 reads features before them)",
            when=lambda f: f["i"].isdigit() and int(f["i"]) >= depth,
        ),
        rename(p + "cls_token", v + "embeddings.class_embedding"),
        rename(p + "pos_embed", v + "embeddings.position_embedding"),
        rename(p + "patch_embed.proj.{w}", v + "embeddings.patch_embedding.{w}"),
        Rule(
            (p + "blocks.{i}.attn.q_bias", p + "blocks.{i}.attn.v_bias"),
            layer + "self_attn.qkv.bias",
            _eva_qkv_bias,
        ),
        rename(p + "blocks.{i}.attn.qkv.weight", layer + "self_attn.qkv.weight"),
        rename(p + "blocks.{i}.attn.proj.{w}", layer + "self_attn.projection.{w}"),
        rename(p + "blocks.{i}.norm1.{w}", layer + "layer_norm1.{w}"),
        rename(p + "blocks.{i}.norm2.{w}", layer + "layer_norm2.{w}"),
        rename(p + "blocks.{i}.mlp.{fc}.{w}", layer + "mlp.{fc}.{w}"),
        *(
            Drop(
                p + f"{name}.{{w}}",
                f"EVA-CLIP's {name}: not a module of create_eva_vit_g's ViT (commented out)",
            )
            for name in ("norm", "fc_norm", "head")
        ),
    )


_TEXT_BRANCH = "the Q-Former's text branch (init_Qformer sets layer.intermediate/output to None)"


def qformer_table(depth: int) -> tuple[Entry, ...]:
    """A LAVIS BLIP-2 checkpoint (Qformer.py BertLMHeadModel, ln_vision, query_tokens) -> Blip2 parts."""
    q, layer = "Qformer.bert.", "Qformer.bert.encoder.layer.{i}."
    to = "qformer.encoder.layer.{i}."
    return (
        rename("query_tokens", "query_tokens"),
        rename("ln_vision.{w}", "vision_model.post_layernorm.{w}"),
        rename(q + "embeddings.LayerNorm.{w}", "qformer.layernorm.{w}"),
        Drop(
            q + "embeddings.{rest:path}",
            "the Q-Former's word/position embeddings: only query tokens enter it",
        ),
        rename(layer + "attention.self.{rest:path}", to + "attention.attention.{rest}"),
        rename(layer + "attention.output.{rest:path}", to + "attention.output.{rest}"),
        rename(layer + "crossattention.self.{rest:path}", to + "crossattention.attention.{rest}"),
        rename(layer + "crossattention.output.{rest:path}", to + "crossattention.output.{rest}"),
        rename(layer + "intermediate_query.{rest:path}", to + "intermediate_query.{rest}"),
        rename(layer + "output_query.{rest:path}", to + "output_query.{rest}"),
        Drop(layer + "intermediate.{rest:path}", _TEXT_BRANCH),
        Drop(layer + "output.{rest:path}", _TEXT_BRANCH),
        Drop(
            "Qformer.cls.{rest:path}", "the Q-Former's masked-LM head (init_Qformer sets Qformer.cls to None)"
        ),
        Drop("t5_proj.{w}", "BLIP-2's projection into Flan-T5; MiniGPT-4 replaces it with llama_proj"),
        Drop("opt_proj.{w}", "BLIP-2's projection into OPT; MiniGPT-4 replaces it with llama_proj"),
        # a BLIP-2 checkpoint that kept its ViT: load_from_pretrained loads it over eva_vit_g.pth
        *eva_table("visual_encoder.", depth),
    )


MINIGPT4_TABLE: tuple[Entry, ...] = (rename("llama_proj.{w}", "language_projection.{w}"),)


def _template(n_query: int) -> str:
    """eval_configs/minigpt4_eval.yaml's ``###Human: {} ###Assistant: `` around
    ``<Img><ImageHere></Img> {question}``, BOS first (get_context_emb); the image's query outputs
    replace the ``<ImageHere>`` tokens."""
    image = "<Img>" + IMAGE_TOKEN * n_query + "</Img> "
    return chat_template(
        bos="{{ bos_token }}",
        user="###Human: CONTENT ",
        assistant="###Assistant: CONTENT",
        image=image,
        generation="###Assistant:",
    )


@register_checkpoint_kind("minigpt4")
def minigpt4(src: Path) -> Conversion:
    """MiniGPT-4 (Vicuna): eva_vit_g.pth, blip2_pretrained*.pth, pretrained_minigpt4*.pth, vicuna/."""
    sizes = Sizes.read(src)
    eva = checkpoint_file(src, find_file(src, ("eva_vit_g.pth",), "the EVA ViT-g weights"))
    blip2 = checkpoint_file(
        src,
        find_file(
            src, ("blip2_pretrained_flant5xxl.pth", "blip2_pretrained*.pth"), "LAVIS's BLIP-2 checkpoint"
        ),
    )
    own = checkpoint_file(
        src, find_file(src, ("pretrained_minigpt4*.pth",), "MiniGPT-4's llama_proj checkpoint")
    )
    vicuna_dir = find_folder(src, "vicuna", "the Vicuna/LLaMA HF folder")
    vicuna = folder_weights(src, vicuna_dir)
    tokenizer = load_tokenizer(vicuna_dir, src)
    image_id = add_image_token(tokenizer)
    config = _config(sizes, read_json(vicuna_dir / "config.json", src), tokenizer, image_id)
    depth = int(sizes.vision["num_hidden_layers"])
    sources = (
        Source(eva, eva_table("", depth)),
        Source(blip2, qformer_table(depth)),
        Source(own, MINIGPT4_TABLE),
        Source(vicuna, causal_lm_table("language_model.model.", "language_model.lm_head.")),
    )
    from transformers import Blip2ForConditionalGeneration

    target = Target(
        Blip2ForConditionalGeneration,
        config,
        _processor(tokenizer, sizes),
        weights_dtype(vicuna, "model.embed_tokens.weight"),
    )
    return Conversion("minigpt4", sources, target, _notes(sizes, src, config, image_id))


def _config(sizes: Sizes, vicuna: Mapping[str, Any], tokenizer: Any, image_id: int) -> Any:
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig

    llama = text_config("LlamaConfig", vicuna, frozenset(), tokenizer, "vicuna/config.json")
    qformer = Blip2QFormerConfig(**sizes.qformer, encoder_hidden_size=sizes.vision["hidden_size"])
    return Blip2Config(
        vision_config=Blip2VisionConfig(**sizes.vision),
        qformer_config=qformer,
        text_config=llama,
        num_query_tokens=sizes.num_query_tokens,
        image_token_index=image_id,
    )


def _processor(tokenizer: Any, sizes: Sizes) -> Any:
    """LAVIS's blip2_image_eval (a bicubic resize to a square, CLIP's mean/std) and the tokenizer;
    the chat template writes the image tokens, so the processor adds none (num_query_tokens=0)."""
    from transformers import Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    side = int(sizes.vision["image_size"])
    images = BlipImageProcessorPil(size={"height": side, "width": side})
    # on the tokenizer: Blip2Processor drops a chat template it is given (its __init__ does not
    # pass it on), and the family reads the tokenizer's when the processor has none
    tokenizer.chat_template = _template(sizes.num_query_tokens)
    return Blip2Processor(images, tokenizer, num_query_tokens=0)


def _notes(sizes: Sizes, src: Path, config: Any, image_id: int) -> tuple[str, ...]:
    own = "sizes.json" if (src / "sizes.json").is_file() else "MiniGPT-4's own"
    return (
        f"sizes: {own} (vision {dict(sizes.vision)}, qformer {dict(sizes.qformer)}, "
        f"{sizes.num_query_tokens} query tokens)",
        f"added {IMAGE_TOKEN} as token {image_id}; vocabulary {config.text_config.vocab_size} "
        "(new rows: the mean of the others)",
        "prompt (chat template): <s>###Human: <Img>[query outputs]</Img> {question} ###Assistant:",
        "ln_vision (LayerNorm eps 1e-5 in the original) runs as Blip2's post_layernorm, whose eps is the "
        "vision config's layer_norm_eps (1e-6): a difference only for near-constant features",
    )
