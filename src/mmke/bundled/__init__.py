"""The embedded default model: a small LLaVA trained from scratch on the world by mmke's own code.

A real ``LlavaForConditionalGeneration`` (small CLIP vision tower, small Llama) with a
word-level tokenizer over the world's closed vocabulary, trained deterministically on CPU on
the world's training corpus and shipped as package data so ``LVLM.load("world")`` needs no
training. ``mmke.models`` finds it by name through ``mmke.registry.bundled_models``.
"""

from mmke.bundled.architecture import build_tokenizer, build_untrained, world_texts
from mmke.bundled.card import model_card
from mmke.bundled.checks import TARGETS, evaluate_checks
from mmke.bundled.presets import METHOD_PRESETS, BundledModel, bundled_dir
from mmke.bundled.spec import WorldModelSpec
from mmke.bundled.training import keep_freed_memory, pretrain_vision, train, train_world_model

__all__ = [
    "METHOD_PRESETS",
    "TARGETS",
    "BundledModel",
    "WorldModelSpec",
    "build_tokenizer",
    "build_untrained",
    "bundled_dir",
    "evaluate_checks",
    "keep_freed_memory",
    "model_card",
    "pretrain_vision",
    "train",
    "train_world_model",
    "world_texts",
]
