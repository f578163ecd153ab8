"""``mmke convert-model`` on tiny releases fabricated in each original's own layout.

Each release is written as its original code saves it: MiniGPT-4's four pieces (EVA ViT-g
state dict, LAVIS BLIP-2 checkpoint ``{"model": ...}``, MiniGPT-4's ``llama_proj`` checkpoint,
a Vicuna folder with 2023-era ``inv_freq`` buffers), LLaVA-Med's sharded safetensors folder and
HuatuoGPT-Vision's pickle folder with the LLaVA code's key names. The converted folders must
compute what the original code computes (re-implemented here from eva_vit.py, Qformer.py,
minigpt_base.py, llava_arch.py and clip_encoder.py), load with ``LVLM.load`` and take every
method of the main job with an exact restore; bad input is one clear line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from mmke.cli import main
from mmke.data.images import ImageStore
from mmke.errors import ConfigError, UnknownNameError
from mmke.models import LVLM
from mmke.models.convert import ConversionError, Drop, Rule, convert_model
from mmke.models.convert._mapping import Source, plan
from mmke.models.scoring import scorer_named
from mmke.models.tiny import bpe_tokenizer
from mmke.registry import checkpoint_kinds
from test_matrix import SETTINGS, _check_changed, _editor
from test_methods import assert_state, make_case, state
from test_methods import store as store  # the image fixture

KINDS = ("minigpt4", "llava_med", "huatuogpt_vision")

# tiny sizes: vision width 32 (2 heads), Q-Former width 16 (2 heads), decoders of width 64
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
VISION |= {"image_size": 32, "patch_size": 8}
QFORMER = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}
N_QUERY = 4
DECODER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
DECODER |= {"num_key_value_heads": 2, "max_position_embeddings": 512, "initializer_range": 0.2}


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMKE_CACHE", str(tmp_path / "cache"))


def _randn(*shape: int, gen: torch.Generator, scale: float = 0.2) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def _norm(d: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return 1 + _randn(d, gen=gen, scale=0.05), _randn(d, gen=gen, scale=0.05)


# --- MiniGPT-4: the original's four pieces ---------------------------------------------------


def _eva_state(gen: torch.Generator, blocks: int) -> dict[str, torch.Tensor]:
    """eva_vit.py VisionTransformer's keys (qkv without bias, q_bias / v_bias apart)."""
    d, m, p = VISION["hidden_size"], VISION["intermediate_size"], VISION["patch_size"]
    n = (VISION["image_size"] // p) ** 2
    sd = {
        "cls_token": _randn(1, 1, d, gen=gen),
        "pos_embed": _randn(1, n + 1, d, gen=gen),
        "patch_embed.proj.weight": _randn(d, 3, p, p, gen=gen, scale=0.05),
        "patch_embed.proj.bias": _randn(d, gen=gen),
    }
    for i in range(blocks):
        b = f"blocks.{i}."
        sd[b + "norm1.weight"], sd[b + "norm1.bias"] = _norm(d, gen)
        sd[b + "attn.q_bias"], sd[b + "attn.v_bias"] = _randn(d, gen=gen), _randn(d, gen=gen)
        sd[b + "attn.qkv.weight"] = _randn(3 * d, d, gen=gen)
        sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = _randn(d, d, gen=gen), _randn(d, gen=gen)
        sd[b + "norm2.weight"], sd[b + "norm2.bias"] = _norm(d, gen)
        sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = _randn(m, d, gen=gen), _randn(m, gen=gen)
        sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = _randn(d, m, gen=gen), _randn(d, gen=gen)
    return sd


def _blip2_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """What LAVIS saves for BLIP-2 (Flan-T5): trained weights only (ln_vision, Q-Former without
    its text branch, query_tokens, t5_proj) plus the Q-Former's position_ids buffer."""
    d, q, m = VISION["hidden_size"], QFORMER["hidden_size"], QFORMER["intermediate_size"]
    sd = {"query_tokens": _randn(1, N_QUERY, q, gen=gen, scale=1.0)}
    sd["ln_vision.weight"], sd["ln_vision.bias"] = _norm(d, gen)
    sd["Qformer.bert.embeddings.LayerNorm.weight"], sd["Qformer.bert.embeddings.LayerNorm.bias"] = _norm(
        q, gen
    )
    sd["Qformer.bert.embeddings.position_ids"] = torch.arange(512).expand(1, -1)
    for i in range(QFORMER["num_hidden_layers"]):
        layer = f"Qformer.bert.encoder.layer.{i}."
        for block, width in [("attention", q)] + ([("crossattention", d)] if i % 2 == 0 else []):
            for w in ("query", "key", "value"):
                sd[f"{layer}{block}.self.{w}.weight"] = _randn(
                    q, q if w == "query" else width, gen=gen, scale=0.4
                )
                sd[f"{layer}{block}.self.{w}.bias"] = _randn(q, gen=gen)
            sd[f"{layer}{block}.output.dense.weight"] = _randn(q, q, gen=gen, scale=0.4)
            sd[f"{layer}{block}.output.dense.bias"] = _randn(q, gen=gen)
            sd[f"{layer}{block}.output.LayerNorm.weight"], sd[f"{layer}{block}.output.LayerNorm.bias"] = (
                _norm(q, gen)
            )
        sd[layer + "intermediate_query.dense.weight"] = _randn(m, q, gen=gen, scale=0.4)
        sd[layer + "intermediate_query.dense.bias"] = _randn(m, gen=gen)
        sd[layer + "output_query.dense.weight"] = _randn(q, m, gen=gen, scale=0.4)
        sd[layer + "output_query.dense.bias"] = _randn(q, gen=gen)
        sd[layer + "output_query.LayerNorm.weight"], sd[layer + "output_query.LayerNorm.bias"] = _norm(q, gen)
    sd["t5_proj.weight"], sd["t5_proj.bias"] = _randn(24, q, gen=gen), _randn(24, gen=gen)
    return sd


def _tokenizer(bos: str | None) -> Any:
    return bpe_tokenizer([], bos=bos) if bos else bpe_tokenizer([], bos=None, eos="<|endoftext|>")


def _minigpt4_release(root: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    root.mkdir(parents=True)
    # eva_vit_g.pth has one block more than the ViT MiniGPT-4 builds (EVA-CLIP's 40 vs 39)
    torch.save(_eva_state(gen, VISION["num_hidden_layers"] + 1), root / "eva_vit_g.pth")
    lavis = {
        "model": _blip2_state(gen),
        "optimizer": {"state": {}},
        "config": {"run": {"lr": 1e-4}},
        "epoch": 9,
    }
    torch.save(lavis, root / "blip2_pretrained_flant5xxl.pth")
    proj = {"llama_proj.weight": _randn(DECODER["hidden_size"], QFORMER["hidden_size"], gen=gen)}
    proj["llama_proj.bias"] = _randn(DECODER["hidden_size"], gen=gen)
    torch.save({"model": proj}, root / "pretrained_minigpt4.pth")
    _vicuna(root / "vicuna")
    sizes = {"vision": VISION, "qformer": QFORMER, "num_query_tokens": N_QUERY}
    (root / "sizes.json").write_text(json.dumps(sizes))
    return root


def _vicuna(folder: Path) -> None:
    """A Vicuna (LLaMA) folder as 2023's transformers saved it: pytorch_model.bin with inv_freq."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer("<s>")
    config = LlamaConfig(
        vocab_size=len(tok), **DECODER, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id
    )
    torch.manual_seed(1)
    lm = LlamaForCausalLM(config)
    sd = dict(lm.state_dict())
    head_dim = DECODER["hidden_size"] // DECODER["num_attention_heads"]
    for i in range(DECODER["num_hidden_layers"]):
        sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = 1 / 10000 ** (
            torch.arange(0, head_dim, 2) / head_dim
        )
    folder.mkdir()
    torch.save(sd, folder / "pytorch_model.bin")
    raw = {k: v for k, v in config.to_dict().items() if k != "rope_parameters"}
    (folder / "config.json").write_text(json.dumps(raw | {"rope_theta": 10000.0, "torch_dtype": "float32"}))
    tok.save_pretrained(folder)


# --- LLaVA-Med / HuatuoGPT-Vision: the LLaVA code's layout -------------------------------------

RELEASES = {
    "llava_med": {
        "model_type": "llava_mistral",
        "lm": "MistralForCausalLM",
        "config": "MistralConfig",
        "bos": "<s>",
    },
    "huatuogpt_vision": {
        "model_type": "llava_qwen2",
        "lm": "Qwen2ForCausalLM",
        "config": "Qwen2Config",
        "bos": None,
    },
}


class _OriginalLlava(nn.Module):
    """LlavaMistralForCausalLM / LlavaQwen2ForCausalLM's module tree (llava_arch.py): the HF causal
    LM's ``model`` with ``vision_tower.vision_tower`` (a CLIPVisionModel) and ``mm_projector``
    (mlp2x_gelu) added, and its ``lm_head``."""

    def __init__(self, kind: str, vocab: int, tok: Any) -> None:
        import transformers

        super().__init__()
        spec = RELEASES[kind]
        text = getattr(transformers, spec["config"])(
            vocab_size=vocab, **DECODER, bos_token_id=tok.bos_token_id
        )
        clip = transformers.CLIPVisionConfig(**VISION)
        lm = getattr(transformers, spec["lm"])(text)
        self.text_config, self.clip_config = text, clip
        self.model, self.lm_head = lm.model, lm.lm_head
        self.model.vision_tower = nn.Module()
        self.model.vision_tower.vision_tower = transformers.CLIPVisionModel(clip)
        d, h = VISION["hidden_size"], DECODER["hidden_size"]
        self.model.mm_projector = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, h))

    def image_features(self, pixels: torch.Tensor, layer: int = -2) -> torch.Tensor:
        """encode_images: CLIP hidden_states[select_layer] without CLS ("patch"), then the projector."""
        out = self.model.vision_tower.vision_tower(pixels, output_hidden_states=True)
        return self.model.mm_projector(out.hidden_states[layer][:, 1:])  # (B, P, H)

    def logits(self, embeds: torch.Tensor) -> torch.Tensor:
        hidden = self.model(inputs_embeds=embeds).last_hidden_state
        return self.lm_head(hidden)  # (B, T, V)


def _llava_config(kind: str, original: _OriginalLlava) -> dict[str, Any]:
    """config.json as the LLaVA code writes it: the decoder's fields (rope_theta, 2024 style) + mm_*."""
    raw = {k: v for k, v in original.text_config.to_dict().items() if k not in ("rope_parameters", "dtype")}
    return raw | {
        "rope_theta": 10000.0,
        "model_type": RELEASES[kind]["model_type"],
        "architectures": ["LlavaMistralForCausalLM" if kind == "llava_med" else "LlavaQwen2ForCausalLM"],
        "torch_dtype": "float32",
        "mm_hidden_size": VISION["hidden_size"],
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "mm_patch_merge_type": "flat",
        "image_aspect_ratio": "pad",
        "use_mm_proj": True,
        "tune_mm_mlp_adapter": False,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        # LLaVA-Med names the hub's CLIP; HuatuoGPT-Vision a folder inside its release
        "mm_vision_tower": "openai/clip-vit-large-patch14-336" if kind == "llava_med" else "vit/clip_336",
    }


def _llava_release(root: Path, kind: str) -> tuple[Path, _OriginalLlava]:
    tok = _tokenizer(RELEASES[kind]["bos"])
    torch.manual_seed(2)
    original = _OriginalLlava(kind, len(tok), tok).eval()
    root.mkdir(parents=True)
    sd = _old_clip_names(original.state_dict(), "model.vision_tower.vision_tower.")
    # older transformers saved CLIP's position ids as a persistent buffer
    sd["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(17).expand(
        1, -1
    )
    if kind == "llava_med":  # sharded safetensors, as on the hub
        keys = sorted(sd)
        shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2]}
        shards["model-00002-of-00002.safetensors"] = keys[len(keys) // 2 :]
        for name, names in shards.items():
            save_file({k: sd[k].contiguous() for k in names}, root / name)
        index = {"weight_map": {k: name for name, names in shards.items() for k in names}}
        (root / "model.safetensors.index.json").write_text(json.dumps(index))
        _clip_folder(root / "vision_tower", original, whole_clip=True)
    else:
        torch.save(sd, root / "pytorch_model.bin")
        _clip_folder(root / "vit" / "clip_336", original, whole_clip=False)
    (root / "config.json").write_text(json.dumps(_llava_config(kind, original)))
    tok.save_pretrained(root)
    return root, original


def _old_clip_names(sd: dict[str, torch.Tensor], tower: str) -> dict[str, torch.Tensor]:
    """transformers 4.x's CLIPVisionModel keys (``vision_model.*``, what the releases were saved
    with) from today's flat ones."""
    return {
        (tower + "vision_model." + k[len(tower) :] if k.startswith(tower) else k): v.clone()
        for k, v in sd.items()
    }


def _clip_folder(folder: Path, original: _OriginalLlava, whole_clip: bool) -> None:
    """The CLIP tower's own folder: LLaVA-Med's is a whole CLIPModel (text half included), with
    weights; HuatuoGPT-Vision's holds only config and preprocessing (the release has the tower)."""
    folder.mkdir(parents=True)
    vision = original.clip_config.to_dict()
    config = {"model_type": "clip", "vision_config": vision, "text_config": {}} if whole_clip else vision
    (folder / "config.json").write_text(json.dumps(config))
    pre = {"crop_size": 32, "size": 32, "image_mean": [0.48145466, 0.4578275, 0.40821073], "resample": 3}
    pre |= {"image_std": [0.26862954, 0.26130258, 0.27577711], "do_center_crop": True}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    if whole_clip:
        sd = _old_clip_names(original.model.vision_tower.vision_tower.state_dict(), "")
        sd["text_model.embeddings.token_embedding.weight"] = torch.zeros(8, 4)
        sd["visual_projection.weight"] = torch.zeros(4, VISION["hidden_size"])
        sd["text_projection.weight"] = torch.zeros(4, 4)
        sd["logit_scale"] = torch.tensor(2.6592)
        save_file(sd, folder / "model.safetensors")


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("releases")
    made = {"minigpt4": _minigpt4_release(root / "minigpt4")}
    for kind in RELEASES:
        made[kind], _ = _llava_release(root / kind, kind)
    return made


@pytest.fixture(scope="module")
def converted(releases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("converted")
    return {kind: convert_model(kind, src, root / kind).out for kind, src in releases.items()}


def _record(out: Path) -> dict[str, Any]:
    return json.loads((out / "conversion.json").read_text())


# --- every key mapped or dropped for a reason -----------------------------------------------


def test_minigpt4_maps_every_key_and_drops_only_what_the_original_never_loads(
    converted: dict[str, Path],
) -> None:
    record = _record(converted["minigpt4"])
    dropped = {(d["file"], d["key"]) for d in record["dropped"]}
    extra_block = {
        ("eva_vit_g.pth", k) for k in _eva_state(torch.Generator(), 3) if k.startswith("blocks.2.")
    }
    assert dropped == extra_block | {
        ("blip2_pretrained_flant5xxl.pth", "Qformer.bert.embeddings.position_ids"),
        ("blip2_pretrained_flant5xxl.pth", "t5_proj.weight"),
        ("blip2_pretrained_flant5xxl.pth", "t5_proj.bias"),
        ("vicuna", "model.layers.0.self_attn.rotary_emb.inv_freq"),
        ("vicuna", "model.layers.1.self_attn.rotary_emb.inv_freq"),
    }
    assert all(d["reason"] for d in record["dropped"])
    assert record["model_class"] == "Blip2ForConditionalGeneration"
    assert set(record["from_files"]) == {
        "eva_vit_g.pth",
        "blip2_pretrained_flant5xxl.pth",
        "pretrained_minigpt4.pth",
        "vicuna",
    }


def test_llava_med_takes_the_tower_from_its_clip_folder_and_huatuo_from_its_checkpoint(
    converted: dict[str, Path],
) -> None:
    med, huatuo = _record(converted["llava_med"]), _record(converted["huatuogpt_vision"])
    med_dropped = {d["key"] for d in med["dropped"] if d["file"] == "."}
    assert med_dropped and all(k.startswith("model.vision_tower.vision_tower.") for k in med_dropped)
    assert {d["key"] for d in med["dropped"] if d["file"] == "vision_tower"} == {
        "text_model.embeddings.token_embedding.weight",
        "visual_projection.weight",
        "text_projection.weight",
        "logit_scale",
    }
    assert set(med["from_files"]) == {".", "vision_tower"}
    assert huatuo["from_files"] == ["."]
    assert [d["key"] for d in huatuo["dropped"]] == [
        "model.vision_tower.vision_tower.vision_model.embeddings.position_ids"
    ]


# --- the converted models compute what the originals compute -----------------------------------


def _layer_norm(x: torch.Tensor, sd: dict[str, torch.Tensor], name: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def _eva_forward(
    sd: dict[str, torch.Tensor], ln: dict[str, torch.Tensor], pixels: torch.Tensor
) -> torch.Tensor:
    """eva_vit.py VisionTransformer.forward (2 blocks) then MiniGPT-4's ln_vision (eps 1e-5)."""
    heads, d = VISION["num_attention_heads"], VISION["hidden_size"]
    x = F.conv2d(
        pixels, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=VISION["patch_size"]
    )
    x = x.flatten(2).transpose(1, 2)  # (B, N, D)
    x = torch.cat([sd["cls_token"].expand(len(x), -1, -1), x], dim=1) + sd["pos_embed"]
    for i in range(VISION["num_hidden_layers"]):
        b = f"blocks.{i}."
        h = _layer_norm(x, sd, b + "norm1", 1e-6)
        bias = torch.cat([sd[b + "attn.q_bias"], torch.zeros(d), sd[b + "attn.v_bias"]])
        q, k, v = (
            F.linear(h, sd[b + "attn.qkv.weight"], bias)
            .reshape(*h.shape[:2], 3, heads, -1)
            .permute(2, 0, 3, 1, 4)
        )
        attn = ((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        x = x + F.linear(
            (attn @ v).transpose(1, 2).flatten(2), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"]
        )
        h = _layer_norm(x, sd, b + "norm2", 1e-6)
        h = F.linear(
            F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])), sd[b + "mlp.fc2.weight"]
        )
        x = x + h + sd[b + "mlp.fc2.bias"]
    return _layer_norm(x, ln, "ln_vision", 1e-5)


def _bert_attention(
    sd: dict[str, torch.Tensor], pre: str, x: torch.Tensor, ctx: torch.Tensor
) -> torch.Tensor:
    """Qformer.py BertAttention (self or cross): attention, dense, residual LayerNorm."""
    heads = QFORMER["num_attention_heads"]

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(*t.shape[:2], heads, -1).transpose(1, 2)  # (B, h, T, d)

    q, k, v = (
        split(F.linear(src, sd[f"{pre}self.{w}.weight"], sd[f"{pre}self.{w}.bias"]))
        for w, src in (("query", x), ("key", ctx), ("value", ctx))
    )
    attn = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
    out = F.linear(
        (attn @ v).transpose(1, 2).flatten(2), sd[pre + "output.dense.weight"], sd[pre + "output.dense.bias"]
    )
    return _layer_norm(out + x, sd, pre + "output.LayerNorm", 1e-12)


def _qformer_forward(
    sd: dict[str, torch.Tensor], image: torch.Tensor, proj: dict[str, torch.Tensor]
) -> torch.Tensor:
    """MiniGPT-4 encode_img: Qformer.bert(query_embeds, encoder_hidden_states) then llama_proj."""
    h = _layer_norm(
        sd["query_tokens"].expand(len(image), -1, -1), sd, "Qformer.bert.embeddings.LayerNorm", 1e-12
    )
    for i in range(QFORMER["num_hidden_layers"]):
        layer = f"Qformer.bert.encoder.layer.{i}."
        h = _bert_attention(sd, layer + "attention.", h, h)
        if i % 2 == 0:  # cross_attention_freq 2
            h = _bert_attention(sd, layer + "crossattention.", h, image)
        f = F.gelu(
            F.linear(
                h, sd[layer + "intermediate_query.dense.weight"], sd[layer + "intermediate_query.dense.bias"]
            )
        )
        f = F.linear(f, sd[layer + "output_query.dense.weight"], sd[layer + "output_query.dense.bias"])
        h = _layer_norm(f + h, sd, layer + "output_query.LayerNorm", 1e-12)
    return F.linear(h, proj["llama_proj.weight"], proj["llama_proj.bias"])  # (B, Q, H)


def _spliced(embeds: torch.Tensor, ids: torch.Tensor, image_id: int, features: torch.Tensor) -> torch.Tensor:
    """The originals' splice: image features where the prompt's image placeholder is."""
    out = embeds.clone()
    out[ids == image_id] = features.reshape(-1, features.shape[-1]).to(out.dtype)
    return out


def _inputs(lvlm: LVLM, image: Image.Image) -> dict[str, torch.Tensor]:
    text = lvlm.family.format_prompt(lvlm.processor, "what is the colour of the sign?", has_image=True)
    return dict(lvlm.processor(text=[text], images=[image], add_special_tokens=False, return_tensors="pt"))


def test_minigpt4_computes_what_the_original_code_computes(
    releases: dict[str, Path], converted: dict[str, Path]
) -> None:
    src = releases["minigpt4"]
    eva = torch.load(src / "eva_vit_g.pth")
    lavis = torch.load(src / "blip2_pretrained_flant5xxl.pth")["model"]
    proj = torch.load(src / "pretrained_minigpt4.pth")["model"]
    lvlm = LVLM.load(converted["minigpt4"], dtype="float32")
    inputs = _inputs(lvlm, Image.new("RGB", (40, 32), (200, 30, 30)))
    with torch.no_grad():
        image = _eva_forward(eva, lavis, inputs["pixel_values"])
        assert torch.allclose(
            lvlm.model.vision_model(inputs["pixel_values"]).last_hidden_state, image, atol=1e-4
        )
        features = _qformer_forward(lavis, image, proj)
        got = lvlm.model.get_image_features(inputs["pixel_values"]).pooler_output
        assert torch.allclose(got, features, atol=1e-4)
        # get_context_emb: the query outputs between <Img> and </Img>, BOS first, through Vicuna
        vicuna = _vicuna_model(src / "vicuna")
        image_id = lvlm.model.config.image_token_id
        ids = inputs["input_ids"]
        assert ids[0, 0] == lvlm.tokenizer.bos_token_id and int((ids == image_id).sum()) == N_QUERY
        embeds = vicuna.get_input_embeddings()(ids.masked_fill(ids == image_id, 0))
        want = vicuna(inputs_embeds=_spliced(embeds, ids, image_id, features)).logits  # (1, T, V)
        logits = lvlm.model(**inputs).logits[..., : want.shape[-1]]
    assert torch.allclose(logits, want, atol=1e-4)


def _vicuna_model(folder: Path) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    raw = json.loads((folder / "config.json").read_text())
    lm = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in raw.items() if k != "torch_dtype"})).eval()
    sd = {k: v for k, v in torch.load(folder / "pytorch_model.bin").items() if "inv_freq" not in k}
    lm.load_state_dict(sd)
    return lm


@pytest.mark.parametrize("kind", list(RELEASES))
def test_llava_releases_compute_what_the_original_code_computes(
    kind: str, tmp_path: Path, converted: dict[str, Path]
) -> None:
    _, original = _llava_release(tmp_path / kind, kind)  # the same seed: the converted release's modules
    lvlm = LVLM.load(converted[kind], dtype="float32")
    inputs = _inputs(lvlm, Image.new("RGB", (40, 32), (30, 30, 200)))
    image_id = lvlm.model.config.image_token_id
    ids = inputs["input_ids"]
    assert int((ids == image_id).sum()) == (VISION["image_size"] // VISION["patch_size"]) ** 2
    with torch.no_grad():
        features = original.image_features(inputs["pixel_values"])
        embeds = original.model.embed_tokens(ids.masked_fill(ids == image_id, 0))
        want = original.logits(_spliced(embeds, ids, image_id, features))
        logits = lvlm.model(**inputs).logits[..., : want.shape[-1]]
    assert torch.allclose(logits, want, atol=1e-4)


def test_the_prompt_format_travels_in_the_chat_template(converted: dict[str, Path]) -> None:
    def written(kind: str) -> str:
        lvlm = LVLM.load(converted[kind])
        return lvlm.family.format_prompt(lvlm.processor, "what is it?", has_image=True)

    assert (
        written("minigpt4") == "<s>###Human: <Img>" + "<image>" * N_QUERY + "</Img> what is it? ###Assistant:"
    )
    assert written("llava_med") == "<s>[INST] <image>\nwhat is it? [/INST]"
    assert written("huatuogpt_vision") == "<|user|>\n<image>\nwhat is it?\n<|assistant|>\n"


# --- the converted folders run the main job ------------------------------------------------


@pytest.mark.parametrize("method", sorted(SETTINGS))
@pytest.mark.parametrize("kind", KINDS)
def test_method_edits_and_restores_on_converted_model(
    kind: str, method: str, converted: dict[str, Path], store: ImageStore
) -> None:
    # the LLaVA releases read CLIP's second-to-last layer (vision_feature_layer -2): FT-Vis edits
    # that layer, the last one whose output reaches the language model
    model = LVLM.load(converted[kind]).bind_images(store)
    case = make_case(image="red.png")
    editor = _editor(method, model)
    before = state(model)
    (pre,) = model.score([case.edit])
    with editor.applied(model, case) as edited:
        (post,) = edited.score([case.edit])
        _check_changed(method, pre.nll, post.nll)
    assert_state(model, before)


def test_converted_models_generate_with_and_without_an_image(
    converted: dict[str, Path], store: ImageStore
) -> None:
    case = make_case(image="red.png")
    for kind in KINDS:
        model = LVLM.load(converted[kind]).bind_images(store)
        with_image, text_only = model.generate([case.edit, case.probes[1]], max_new_tokens=3)
        assert with_image and text_only, kind


# --- bad input: one clear line --------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _resave(path: Path, change: Any) -> None:
    obj = torch.load(path)
    change(obj.get("model", obj))
    torch.save(obj, path)


def test_a_missing_key_names_the_file_and_the_key(releases: dict[str, Path], tmp_path: Path) -> None:
    src = _copy(releases["minigpt4"], tmp_path / "src")
    _resave(src / "eva_vit_g.pth", lambda sd: sd.pop("blocks.1.attn.v_bias"))
    with pytest.raises(ConversionError, match=r"^eva_vit_g\.pth: key 'blocks\.1\.attn\.v_bias' is missing"):
        convert_model("minigpt4", src, tmp_path / "out")
    src = _copy(releases["minigpt4"], tmp_path / "src2")
    _resave(src / "pretrained_minigpt4.pth", lambda sd: sd.pop("llama_proj.bias"))
    with pytest.raises(
        ConversionError, match=r"^pretrained_minigpt4\.pth: key 'llama_proj\.bias' is missing"
    ):
        convert_model("minigpt4", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing is written before the whole plan holds


def test_an_unmapped_key_names_the_file_and_the_key(releases: dict[str, Path], tmp_path: Path) -> None:
    src = _copy(releases["huatuogpt_vision"], tmp_path / "src")
    _resave(src / "pytorch_model.bin", lambda sd: sd.update({"model.image_newline": torch.zeros(64)}))
    with pytest.raises(
        ConversionError, match=r"^pytorch_model\.bin: key 'model\.image_newline' is not mapped"
    ):
        convert_model("huatuogpt_vision", src, tmp_path / "out")


def test_a_wrong_shape_names_the_file_the_key_and_both_shapes(
    releases: dict[str, Path], tmp_path: Path
) -> None:
    src = _copy(releases["huatuogpt_vision"], tmp_path / "src")
    _resave(
        src / "pytorch_model.bin", lambda sd: sd.update({"model.mm_projector.2.weight": torch.zeros(64, 32)})
    )
    with pytest.raises(ConversionError) as err:
        convert_model("huatuogpt_vision", src, tmp_path / "out")
    line = str(err.value)
    assert line.startswith("pytorch_model.bin: model.mm_projector.2.weight (64, 32)") and "\n" not in line
    assert "'model.multi_modal_projector.linear_2.weight'" in line and "(64, 64)" in line


def test_unknown_kind_missing_src_and_missing_files_are_one_line(
    releases: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(UnknownNameError, match=r"unknown checkpoint kind 'minigpt'; did you mean 'minigpt4'"):
        convert_model("minigpt", releases["minigpt4"], tmp_path / "out")
    with pytest.raises(ConversionError, match=r"nowhere: no such folder"):
        convert_model("llava_med", tmp_path / "nowhere", tmp_path / "out")
    src = _copy(releases["minigpt4"], tmp_path / "src")
    (src / "pretrained_minigpt4.pth").unlink()
    with pytest.raises(ConversionError, match=r"missing pretrained_minigpt4\*\.pth"):
        convert_model("minigpt4", src, tmp_path / "out")
    with pytest.raises(
        ConversionError, match=r"model_type is 'llava_mistral'; huatuogpt_vision conversion supports"
    ):
        convert_model("huatuogpt_vision", releases["llava_med"], tmp_path / "out")


def test_cli_converts_and_reports_bad_input_in_one_line(
    releases: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert (
        main(["convert-model", "huatuogpt_vision", str(releases["huatuogpt_vision"]), "--out", str(out)]) == 0
    )
    assert "LlavaForConditionalGeneration" in capsys.readouterr().out
    assert (
        main(["convert-model", "huatuogpt_vision", str(releases["huatuogpt_vision"]), "--out", str(out)]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not an empty folder" in err
    assert main(["convert-model", "llava", str(releases["llava_med"]), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmke: error: unknown checkpoint kind 'llava'") and err.count("\n") == 1


def test_cli_help_names_every_registered_kind() -> None:
    from mmke.cli import _parser

    sub = next(a for a in _parser()._actions if a.dest == "command")
    kind_help = next(a.help for a in sub.choices["convert-model"]._actions if a.dest == "kind")
    assert all(kind in kind_help for kind in checkpoint_kinds.names())


# --- the mechanism on its own -------------------------------------------------------------


class _Dict:
    """A checkpoint held in memory."""

    def __init__(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        self.name, self._t = name, tensors

    def names(self) -> list[str]:
        return list(self._t)

    def shape(self, key: str) -> torch.Size:
        return self._t[key].shape

    def tensor(self, key: str) -> torch.Tensor:
        return self._t[key]

    def where(self, key: str) -> str:
        return self.name


def test_plan_applies_drops_with_conditions_joins_and_later_sources_override() -> None:
    first = _Dict("a.pth", {"l.0.w": torch.ones(2), "l.1.w": torch.ones(2), "l.5.w": torch.ones(2)})
    second = _Dict("b.pth", {"p.1.x": torch.zeros(1), "p.1.y": torch.zeros(1)})
    table = (Drop("l.{i}.w", "past the depth", when=lambda f: int(f["i"]) > 1), Rule(("l.{i}.w",), "t.{i}"))
    join = Rule(("p.{i}.x", "p.{i}.y"), "t.{i}", lambda parts, shape: torch.cat(list(parts)))
    planned = plan(
        [Source(first, table), Source(second, (join,))], {"t.0": torch.Size([2]), "t.1": torch.Size([2])}
    )
    assert planned.dropped == [("a.pth", "l.5.w", "past the depth")]
    assert planned.assignments["t.1"].keys == ("p.1.x", "p.1.y")  # the later source replaced a.pth's
    assert torch.equal(planned.assignments["t.1"].tensor(torch.Size([2])), torch.zeros(2))


def test_plan_refuses_a_target_the_model_lacks_and_names_a_missing_one() -> None:
    ckpt = _Dict("a.pth", {"l.0.w": torch.ones(2), "l.3.w": torch.ones(2)})
    with pytest.raises(
        ConversionError, match=r"^a\.pth: key 'l\.3\.w' maps to 't\.3', which the target model"
    ):
        plan([Source(ckpt, (Rule(("l.{i}.w",), "t.{i}"),))], {"t.0": torch.Size([2])})
    ckpt = _Dict("a.pth", {"l.0.w": torch.ones(2)})
    with pytest.raises(ConversionError, match=r"^a\.pth: key 'l\.1\.w' is missing \(for 't\.1'\)"):
        plan([Source(ckpt, (Rule(("l.{i}.w",), "t.{i}"),))], {"t.0": torch.Size([2]), "t.1": torch.Size([2])})


def test_a_paper_format_without_image_tokens_is_refused_for_minigpt4(
    converted: dict[str, Path], store: ImageStore
) -> None:
    """VLKEB's BLIP-2 format assumes the processor puts the queries first; the converted MiniGPT-4's
    adds none (its chat template writes them): scoring it so would drop the image, so it stops."""
    model = LVLM.load(converted["minigpt4"]).bind_images(store).bind_scorer(scorer_named("vlkeb"))
    with pytest.raises(ConfigError, match=r"item 0: has an image.*scoring=mmke"):
        model.score([make_case(image="red.png").edit])
