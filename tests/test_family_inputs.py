"""Families that build prompt and answer apart: where the answer starts reaches them, and what
they build from it (PaliGemma's suffix, InstructBLIP's Q-Former text, Mistral 3's join)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mmke.data.images import ImageStore
from mmke.errors import ModelLoadError
from mmke.models import LVLM
from mmke.models.families.instructblip import QFORMER_MAX_TOKENS, qformer_inputs
from mmke.models.tiny import tiny_model
from mmke.types import ImageRef, Sample

# --- PaliGemma: the suffix is the whole answer ------------------------------------------------


def test_paligemma_target_with_a_line_break_is_one_suffix(store: ImageStore) -> None:
    lvlm = tiny_model("paligemma").bind_images(store)
    item = Sample("what is this?", "a red\nsquare", ImageRef("red.png"))
    batch = lvlm.encode([item])
    ids, types = batch.inputs["input_ids"][0], batch.inputs["token_type_ids"][0]  # (T,), (T,)
    # the official processor with the answer as its suffix (which it ends with EOS)
    official = lvlm.processor(text="<image>" + item.prompt, images=store.open(item.image), suffix=item.target)
    assert ids.tolist() == official["input_ids"][0][:-1]
    assert types.tolist() == official["token_type_ids"][0][:-1]
    answer = batch.labels[0] != -100  # (T,)
    assert torch.equal(answer, types == 1)  # every answer token is suffix, every suffix token answer
    assert lvlm.tokenizer.decode(ids[answer]) == item.target


def test_paligemma_prompt_alone_is_all_prefix(store: ImageStore) -> None:
    lvlm = tiny_model("paligemma").bind_images(store)
    item = Sample("what is this?", "a red\nsquare", ImageRef("red.png"))
    enc = lvlm._preprocess([lvlm.prompt_text(item)], [store.open(item.image)], "left")
    assert not enc.inputs["token_type_ids"].any()


# --- InstructBLIP: the Q-Former reads the instruction, never the answer -----------------------


def test_instructblip_answer_does_not_reach_the_logits_before_it(store: ImageStore) -> None:
    lvlm = tiny_model("instructblip").bind_images(store)
    items = [Sample("what is this?", t, ImageRef("red.png")) for t in ("a red square", "the blue sky")]
    batches = [lvlm.encode([it]) for it in items]
    with torch.no_grad():
        logits = [lvlm.logits(b, answer_only=False)[0] for b in batches]  # (T, V) each
    first = int(batches[0].answer_mask[0].int().argmax())  # the first answer token's position
    assert first == int(batches[1].answer_mask[0].int().argmax())
    torch.testing.assert_close(logits[0][:first], logits[1][:first], atol=1e-6, rtol=1e-6)
    # the check can see a leak: with the whole text in the Q-Former, the query outputs move
    leaked = batches[1].inputs | qformer_inputs(lvlm.processor.qformer_tokenizer, list(batches[1].texts))
    with torch.no_grad():
        moved = lvlm.family.forward(lvlm.model, leaked).logits[0]  # (T, V)
    assert not torch.allclose(moved[:first], logits[1][:first], atol=1e-3)


def test_instructblip_qformer_rows_are_the_image_items_prompts(store: ImageStore) -> None:
    lvlm = tiny_model("instructblip").bind_images(store)
    items = [
        Sample("what is this?", "red", ImageRef("red.png")),
        Sample("the capital of france is", "paris"),
        Sample("who painted this picture?", "nobody", ImageRef("blue.png")),
    ]
    inputs = lvlm.encode(items).inputs
    assert inputs["pixel_values"].shape[0] == inputs["qformer_input_ids"].shape[0] == 2
    qtok = lvlm.processor.qformer_tokenizer
    assert qtok.batch_decode(inputs["qformer_input_ids"], skip_special_tokens=True) == [
        "what is this?",
        "who painted this picture?",
    ]
    assert "qformer_input_ids" not in lvlm.encode(items[1:2]).inputs  # text alone: the LM alone


def test_instructblip_long_prompts_keep_their_end_in_the_qformer(store: ImageStore) -> None:
    lvlm = tiny_model("instructblip").bind_images(store)
    prompt = "the sign is red and the sky is blue. " * 40 + "what is this?"
    ids = lvlm.encode([Sample(prompt, "red", ImageRef("red.png"))]).inputs["qformer_input_ids"][0]
    qtok = lvlm.processor.qformer_tokenizer
    assert len(ids) == QFORMER_MAX_TOKENS
    assert ids[0] == qtok.cls_token_id and ids[-1] == qtok.sep_token_id
    assert qtok.decode(ids, skip_special_tokens=True).endswith("blue. what is this?")


def test_encoder_decoder_instructblip_is_refused_in_one_line(tmp_path: Path) -> None:
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration, T5Config

    lvlm = tiny_model("instructblip")
    config = InstructBlipConfig(  # InstructBLIP with a (tiny) Flan-T5 as its language model
        vision_config=lvlm.model.config.vision_config.to_dict(),
        qformer_config=lvlm.model.config.qformer_config.to_dict(),
        text_config=T5Config(vocab_size=len(lvlm.tokenizer), d_model=32, d_ff=64, num_layers=1, num_heads=2),
        num_query_tokens=4,
    )
    InstructBlipForConditionalGeneration(config).save_pretrained(tmp_path)
    lvlm.processor.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"encoder-decoder language model \(t5") as err:
        LVLM.load(tmp_path)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)


# --- Mistral 3: the answer follows [/INST] directly -------------------------------------------


def test_mistral3_answer_follows_inst_without_space() -> None:
    lvlm = tiny_model("mistral3")
    item = Sample("the capital of france is", "paris")
    text = lvlm.full_text(item)
    assert text.endswith("[/INST]paris")
    # as the chat template writes the assistant's turn (then EOS)
    turns = [
        {"role": "user", "content": [{"type": "text", "text": item.prompt}]},
        {"role": "assistant", "content": item.target},
    ]
    chat = lvlm.processor.apply_chat_template(turns, tokenize=False)
    assert chat == text + lvlm.tokenizer.eos_token
    (s,) = lvlm.score([item])
    assert s.target_ids.tolist() == lvlm.tokenizer.encode("paris", add_special_tokens=False)
    lvlm.prompt_format = replace(lvlm.prompt_format, separator=" ")  # a format's own join still wins
    assert lvlm.full_text(item).endswith("[/INST] paris")
