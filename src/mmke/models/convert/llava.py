"""LLaVA-1.5-code releases (LLaVA-Med v1.5, HuatuoGPT-Vision) -> LlavaForConditionalGeneration.

Both ship one HF-style folder written by the original LLaVA code: ``config.json`` (the decoder's
config plus LLaVA's ``mm_*`` fields), weights with keys ``model.mm_projector.{0,2}.*``,
``model.vision_tower.vision_tower.vision_model.*``, ``model.layers.*``, ``lm_head.weight``, and
the tokenizer. Read from microsoft/LLaVA-Med: llava/model/llava_arch.py, language_model/
llava_mistral.py, multimodal_encoder/{builder,clip_encoder}.py, multimodal_projector/builder.py,
model/builder.py, mm_utils.py, conversation.py, eval/model_vqa.py; and from
FreedomIntelligence/HuatuoGPT-Vision: cli.py, llava/model/language_model/llava_qwen2.py,
llava_arch.py, multimodal_encoder/{builder,clip_encoder}.py.

SRC layout: the release folder as downloaded, plus the CLIP tower folder its config names::

    SRC/config.json, SRC/*.safetensors or SRC/pytorch_model*.bin (+ index), tokenizer files
    SRC/<mm_vision_tower>/ or SRC/vision_tower/   CLIP folder: config.json, preprocessor_config.json,
                                                  weights (optional when the checkpoint holds the tower)

Without a tower folder, a tower named by a known hub id (``KNOWN_TOWERS``) takes its config from
that table and its weights from the checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmke.models.convert._common import (
    IMAGE_TOKEN,
    POSITION_IDS_REASON,
    add_image_token,
    causal_lm_table,
    chat_template,
    text_config,
    weights_dtype,
)
from mmke.models.convert._files import (
    TensorFiles,
    folder_weights,
    has_folder_weights,
    inside,
    load_tokenizer,
    read_json,
)
from mmke.models.convert._mapping import ConversionError, Drop, Entry, Source, rename
from mmke.models.convert._write import Conversion, Target
from mmke.registry import register_checkpoint_kind

#: LLaVA's own fields in config.json (llava_arch.py initialize_vision_modules, train.py): read
#: here or irrelevant to inference, never passed to the decoder's config.
LLAVA_FIELDS = frozenset(
    {
        "mm_vision_tower",
        "vision_tower",
        "mm_hidden_size",
        "mm_projector_type",
        "mm_vision_select_layer",
        "mm_vision_select_feature",
        "mm_use_im_start_end",
        "mm_use_im_patch_token",
        "mm_patch_merge_type",
        "image_aspect_ratio",
        "image_grid_pinpoints",
        "use_mm_proj",
        "tune_mm_mlp_adapter",
        "freeze_mm_mlp_adapter",
        "unfreeze_mm_vision_tower",
        "mm_projector_lr",
        "mm_vision_tower_lr",
        "tokenizer_model_max_length",
        "tokenizer_padding_side",
        "feature_outs",
        "img_size",
        "vision_backbone",
        "segtok_posembed",
    }
)

#: CLIP towers by the hub id releases name them with (values of the hub's config.json), for a
#: SRC without the tower folder: the weights must then be in the checkpoint.
KNOWN_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    },
}

_CKPT_TOWER = "model.vision_tower.vision_tower."
#: CLIP image-processor settings carried over from the tower's preprocessor_config.json.
_IMAGE_FIELDS = (
    "image_mean",
    "image_std",
    "resample",
    "do_center_crop",
    "do_normalize",
    "do_rescale",
    "rescale_factor",
)


@dataclass(frozen=True)
class Release:
    """What differs between releases of LLaVA-1.5's code: decoder, prompt format, tower, padding."""

    kind: str
    model_type: str  # what the release's code registers its config as
    text_config: str  # the transformers config class of its decoder
    chat_template: str
    prompt: str  # the format in words (for the conversion record)
    tower_from_checkpoint: bool  # which tower weights the original code runs with
    tower_reason: str  # why the other copy is not used
    pad_always: bool  # pad every image to a square, whatever image_aspect_ratio says


LLAVA_MED = Release(
    kind="llava_med",
    model_type="llava_mistral",
    text_config="MistralConfig",
    # conv_mistral_instruct (conversation.py, SeparatorStyle.LLAMA_2, system "", sep2 "</s>"), the
    # question after "<image>\n" (eval/model_vqa.py); BOS from the tokenizer
    chat_template=chat_template(
        bos="{{ bos_token }}",
        user="[INST] CONTENT [/INST]",
        assistant=" CONTENT </s>",
        image=IMAGE_TOKEN + "\n",
        generation="",
    ),
    prompt="<s>[INST] <image>\\n{question} [/INST]",
    # the tower is built with delay_load=True, so from_pretrained never fills it from the
    # checkpoint; model/builder.py then calls vision_tower.load_model() (CLIP from mm_vision_tower)
    tower_from_checkpoint=False,
    tower_reason="the checkpoint's copy of the tower: LLaVA-Med loads it from mm_vision_tower instead "
    "(model/builder.py: vision_tower.load_model())",
    pad_always=False,  # mm_utils.process_images pads only when image_aspect_ratio == "pad"
)

HUATUOGPT_VISION = Release(
    kind="huatuogpt_vision",
    model_type="llava_qwen2",
    text_config="Qwen2Config",
    # cli.py preprocess_huatuo: "<|user|>\n{h}\n" then "<|assistant|>\n", the image placeholder
    # "<image>\n" before the text (insert_image_placeholder); no BOS (add_special_tokens=False)
    chat_template=chat_template(
        bos="",
        user="<|user|>\nCONTENT\n",
        assistant="<|assistant|>\nCONTENT \n",
        image=IMAGE_TOKEN + "\n",
        generation="<|assistant|>\n",
    ),
    prompt="<|user|>\\n<image>\\n{question}\\n<|assistant|>\\n",
    # cli.py: after load_model() it reloads the tower from the release folder itself
    # (vision_tower.from_pretrained(model_dir)), so the checkpoint's copy is what runs
    tower_from_checkpoint=True,
    tower_reason="",
    pad_always=True,  # cli.py get_image_tensors: `if True or ... == 'pad'`: always expand2square
)


@register_checkpoint_kind("llava_med")
def llava_med(src: Path) -> Conversion:
    """LLaVA-Med v1.5 (Mistral-7B): the release folder (model_type llava_mistral) and its CLIP tower."""
    return convert_release(LLAVA_MED, src)


@register_checkpoint_kind("huatuogpt_vision")
def huatuogpt_vision(src: Path) -> Conversion:
    """HuatuoGPT-Vision (Qwen2-7B): the release folder (model_type llava_qwen2) and its CLIP tower."""
    return convert_release(HUATUOGPT_VISION, src)


def convert_release(release: Release, src: Path) -> Conversion:
    """Read a LLaVA-code release folder: its checkpoint and tables, the target config and processor."""
    from transformers import LlavaForConditionalGeneration

    raw = read_json(src / "config.json", src)
    _check_settings(release, raw)
    tower = Tower.find(src, raw)
    ckpt = folder_weights(src, src)
    tokenizer = load_tokenizer(src, src)
    image_id = add_image_token(tokenizer)
    config = _config(release, raw, tower, tokenizer, image_id)
    sources, weights_from = _sources(release, ckpt, tower)
    processor = _processor(release, raw, tower, tokenizer, config)
    dtype = weights_dtype(ckpt, "model.embed_tokens.weight")
    notes = (
        f"vision tower: config from {tower.where}; weights from {weights_from}",
        f"added {IMAGE_TOKEN} as token {image_id}; vocabulary {config.text_config.vocab_size} "
        "(new rows, if any: the mean of the others)",
        f"prompt (chat template): {release.prompt}",
        "the original tokenises the text on each side of <image> separately (tokenizer_image_token); "
        "the converted processor tokenises the whole prompt",
        "images padded to a square with the mean colour"
        if processor.image_processor.do_pad
        else "images resized and centre-cropped (no padding)",
    )
    return Conversion(
        release.kind, sources, Target(LlavaForConditionalGeneration, config, processor, dtype), notes
    )


def _check_settings(release: Release, raw: Mapping[str, Any]) -> None:
    """Refuse settings LlavaForConditionalGeneration cannot express, each in one line."""
    problems = {
        "model_type": (raw.get("model_type"), (release.model_type,)),
        # multimodal_projector/builder.py: mlp2x_gelu = Linear, GELU, Linear (LLaVA's projector)
        "mm_projector_type": (raw.get("mm_projector_type", "linear"), ("mlp2x_gelu",)),
        "mm_use_im_start_end": (bool(raw.get("mm_use_im_start_end", False)), (False,)),
        "mm_patch_merge_type": (raw.get("mm_patch_merge_type", "flat"), ("flat",)),
        "image_aspect_ratio": (raw.get("image_aspect_ratio"), (None, "pad", "square")),
        "mm_vision_select_feature": (raw.get("mm_vision_select_feature", "patch"), ("patch", "cls_patch")),
    }
    for name, (value, allowed) in problems.items():
        if value not in allowed:
            wanted = " or ".join(repr(a) for a in allowed)
            raise ConversionError(
                f"config.json: {name} is {value!r}; {release.kind} conversion supports {wanted}"
            )


@dataclass(frozen=True)
class Tower:
    """The CLIP vision tower a release names: its config, preprocessing and (maybe) weights."""

    config: Mapping[str, Any]
    preprocessing: Mapping[str, Any]
    weights: TensorFiles | None
    where: str

    @classmethod
    def find(cls, src: Path, raw: Mapping[str, Any]) -> Tower:
        """SRC/<mm_vision_tower>/ (HuatuoGPT's builder joins it to the model folder), else
        SRC/vision_tower/, else a known hub id's config."""
        name = str(raw.get("mm_vision_tower") or raw.get("vision_tower") or "")
        for folder in _tower_folders(src, name):
            if (folder / "config.json").is_file():
                return cls._from_folder(src, folder)
        if name in KNOWN_TOWERS:
            return cls(KNOWN_TOWERS[name], {}, None, f"the known tower {name}")
        raise ConversionError(
            f"{src}: no CLIP tower for mm_vision_tower {name!r}: put its folder (config.json, "
            "preprocessor_config.json) at SRC/vision_tower/"
        )

    @classmethod
    def _from_folder(cls, src: Path, folder: Path) -> Tower:
        config = read_json(folder / "config.json", src)
        if config.get("model_type") == "clip":  # a whole CLIP model's folder: its vision half
            config = dict(config.get("vision_config") or {})
        pre = folder / "preprocessor_config.json"
        preprocessing = read_json(pre, src) if pre.is_file() else {}
        weights = folder_weights(src, folder) if has_folder_weights(folder) else None
        return cls(config, preprocessing, weights, str(folder.relative_to(src)))


def _tower_folders(src: Path, name: str) -> list[Path]:
    folders = []
    if name and not Path(name).is_absolute():
        # a path outside SRC is one on the machine the release was trained on: not ours to follow
        with contextlib.suppress(ConversionError):
            folders.append(inside(src, name, "mm_vision_tower"))
    return [*folders, src / "vision_tower"]


#: A CLIP folder's keys (CLIPVisionModel or a whole CLIPModel) -> the LLaVA vision tower.
TOWER_TABLE: tuple[Entry, ...] = (
    Drop("vision_model.embeddings.position_ids", POSITION_IDS_REASON),
    rename("vision_model.{rest:path}", "model.vision_tower.{rest}"),
    Drop("text_model.{rest:path}", "CLIP's text encoder: LLaVA uses only the vision tower"),
    Drop("text_projection.weight", "CLIP's text projection: LLaVA uses only the vision tower"),
    Drop("visual_projection.weight", "CLIP's image projection: LLaVA takes hidden states before it"),
    Drop("logit_scale", "CLIP's contrastive temperature: not part of the vision tower"),
)


def checkpoint_table(tower: str | None) -> tuple[Entry, ...]:
    """A LLaVA-code checkpoint's keys; ``tower`` None maps its tower copy, else drops it for that reason."""
    own = _CKPT_TOWER + "vision_model."
    keep_tower = rename(own + "{rest:path}", "model.vision_tower.{rest}")
    return (
        rename("model.mm_projector.0.{w}", "model.multi_modal_projector.linear_1.{w}"),
        rename("model.mm_projector.2.{w}", "model.multi_modal_projector.linear_2.{w}"),
        Drop(own + "embeddings.position_ids", POSITION_IDS_REASON),
        keep_tower if tower is None else Drop(_CKPT_TOWER + "{rest:path}", tower),
        *causal_lm_table("model.language_model.", "lm_head."),
    )


def _sources(release: Release, ckpt: TensorFiles, tower: Tower) -> tuple[tuple[Source, ...], str]:
    """The checkpoint, and the tower folder's weights when the original runs with those."""
    has_copy = any(k.startswith(_CKPT_TOWER) for k in ckpt.names())
    if has_copy and (release.tower_from_checkpoint or tower.weights is None):
        return (Source(ckpt, checkpoint_table(None)),), f"the checkpoint ({ckpt.name})"
    if tower.weights is None:
        raise ConversionError(
            f"{ckpt.name}: no vision tower weights: the checkpoint has no {_CKPT_TOWER}* keys and "
            f"{tower.where} has no weight files"
        )
    sources = (Source(ckpt, checkpoint_table(release.tower_reason)), Source(tower.weights, TOWER_TABLE))
    return sources, tower.weights.name


def _config(release: Release, raw: Mapping[str, Any], tower: Tower, tokenizer: Any, image_id: int) -> Any:
    from transformers import CLIPVisionConfig, LlavaConfig

    vision = CLIPVisionConfig(**tower.config)
    text = text_config(release.text_config, raw, LLAVA_FIELDS, tokenizer, "config.json")
    # clip_encoder.py feature_select: "patch" drops CLS, "cls_patch" keeps it
    strategy = "full" if raw.get("mm_vision_select_feature") == "cls_patch" else "default"
    patches = (vision.image_size // vision.patch_size) ** 2
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_id,
        image_seq_length=patches + (strategy == "full"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        # clip_encoder.py: hidden_states[select_layer]; HuatuoGPT defaults it to -2
        vision_feature_layer=int(raw.get("mm_vision_select_layer", -2)),
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
    )


def _processor(release: Release, raw: Mapping[str, Any], tower: Tower, tokenizer: Any, config: Any) -> Any:
    """CLIP's preprocessing (the tower's own settings when its folder has them), padded to a square
    with the mean colour as mm_utils.expand2square does, and the release's chat template."""
    from transformers import LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    side = int(config.vision_config.image_size)
    fields = {k: tower.preprocessing[k] for k in _IMAGE_FIELDS if k in tower.preprocessing}
    pad = release.pad_always or raw.get("image_aspect_ratio") == "pad"
    images = LlavaImageProcessorPil(
        **fields,
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        do_pad=pad,
    )
    return LlavaProcessor(
        images,
        tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=release.chat_template,
        image_token=IMAGE_TOKEN,
    )
