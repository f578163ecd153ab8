"""Shared by conversions: the HF causal-LM key table, the image token, text configs, chat templates."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mmke.models.convert._mapping import Checkpoint, ConversionError, Drop, Entry, grow_rows, rename

IMAGE_TOKEN = "<image>"

ROTARY_REASON = (
    "rotary frequencies: a buffer older transformers saved; transformers rebuilds it from the config"
)
POSITION_IDS_REASON = "position ids: a buffer (torch.arange) older transformers saved; it is rebuilt"

#: Fields of a release's config.json that describe the checkpoint, not the decoder.
_META_FIELDS = frozenset(
    {"_name_or_path", "architectures", "model_type", "torch_dtype", "dtype", "transformers_version"}
)


def causal_lm_table(model_to: str, head_to: str) -> tuple[Entry, ...]:
    """An HF causal LM's keys (``model.*`` and ``lm_head``, as Llama/Mistral/Qwen2ForCausalLM save
    them) moved under ``model_to`` / ``head_to``; the vocabulary matrices grow for added tokens."""
    return (
        Drop("model.layers.{i}.self_attn.rotary_emb.inv_freq", ROTARY_REASON),
        rename("model.embed_tokens.weight", model_to + "embed_tokens.weight", grow_rows),
        rename("lm_head.weight", head_to + "weight", grow_rows),
        rename("model.layers.{rest:path}", model_to + "layers.{rest}"),
        rename("model.norm.{w}", model_to + "norm.{w}"),
    )


def add_image_token(tokenizer: Any) -> int:
    """Register ``<image>`` as a special token (the originals splice features in by position instead
    of by id) and return its id."""
    from tokenizers import AddedToken

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def text_config(
    class_name: str, raw: Mapping[str, Any], skip: frozenset[str], tokenizer: Any, where: str
) -> Any:
    """The decoder's transformers config from a release's config.json (``skip``: the release's own
    fields), its vocabulary large enough for the tokenizer with ``<image>`` added."""
    import transformers

    fields = {k: v for k, v in raw.items() if k not in skip | _META_FIELDS}
    fields["vocab_size"] = max(int(raw.get("vocab_size") or 0), len(tokenizer))
    try:
        return getattr(transformers, class_name)(**fields)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: not a {class_name} ({str(e).splitlines()[0]})") from None


def weights_dtype(ckpt: Checkpoint, key: str) -> torch.dtype:
    """The dtype the release keeps its decoder in (what the converted weights are saved as)."""
    return ckpt.tensor(key).dtype if key in ckpt.names() else torch.float32


def chat_template(bos: str, user: str, assistant: str, image: str, generation: str) -> str:
    """A Jinja chat template: ``user`` / ``assistant`` turns hold ``CONTENT`` (text, and ``image``
    where an image part is); ``generation`` opens the answer. Written from the originals' own
    prompt builders, so the format travels with the model in its saved tokenizer/processor."""
    content = (
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
        + _literal(image)
        + "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    )
    return (
        _literal(bos)
        + "{% for message in messages %}{% if message['role'] == 'user' %}"
        + _literal(user).replace("CONTENT", content)
        + "{% else %}"
        + _literal(assistant).replace("CONTENT", content)
        + "{% endif %}{% endfor %}{% if add_generation_prompt %}"
        + _literal(generation)
        + "{% endif %}"
    )


def _literal(text: str) -> str:
    """Newlines as Jinja expressions: transformers renders templates with ``trim_blocks``, which
    would eat a newline written right after a ``{% ... %}`` tag."""
    return text.replace("\n", "{{ '\\n' }}")
