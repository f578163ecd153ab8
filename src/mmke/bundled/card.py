"""The world model's model card: how it was trained and what it measured."""

from __future__ import annotations

from typing import Any

from mmke.bundled.checks import TARGETS


def _targets_section(checks: dict[str, dict[str, float]]) -> str:
    lines = [
        f"- {name}: target {100 * floor:.0f}%, measured {100 * checks[name]['exact_match']:.1f}% "
        f"({'met' if checks[name]['exact_match'] >= floor else 'NOT met'})"
        for name, floor in TARGETS.items()
        if name in checks
    ]
    return "\n".join(lines)


def model_card(report: dict[str, Any]) -> str:
    """A model card that records how the model was trained and what it measured."""
    spec = report["spec"]
    vision_seconds, vision_loss = report.get("vision_seconds", "-"), report.get("vision_final_loss", "-")
    rows = "\n".join(
        f"| {name} | {c['n']} | {100 * c['exact_match']:.1f} | {100 * c['token_accuracy']:.1f} |"
        for name, c in report["checks"].items()
    )
    return f"""# world-model (mmke's embedded default LVLM)

A `LlavaForConditionalGeneration` trained from scratch by `mmke build model` on the training
corpus of the generated world benchmark (`mmke build world`, seed {report["world"].get("seed")}).
Nothing in it was downloaded: the weights, the word-level tokenizer and the processor are all
made by mmke's own deterministic code on a CPU.

- Parameters: {report["parameters"]:,}
- Vision: CLIP ViT, {spec["vision_layers"]} layers, width {spec["vision_hidden"]},
  {spec["image_size"]}px images in {spec["patch_size"]}px patches; projector: LLaVA's 2-layer MLP.
- Language: Llama, {spec["text_layers"]} layers, width {spec["text_hidden"]}, MLP {spec["text_intermediate"]}.
- Prompt format: `USER: <image>\\n{{question}} ASSISTANT: {{answer}}` (no chat template).
- Stage 1 (vision): the CLIP tower and a linear head classify the world's visual entities for
  {spec.get("vision_rounds", 0)} rounds, each on {_round_views(spec)} per entity
  plus its training views (never the held-out views){_jitter_note(spec)};
  {vision_seconds} s, final loss {vision_loss}{_reuse_note(report)}. Stage 2 keeps the tower frozen.
- Stage 2 (all but the tower): AdamW (lr {spec["lr"]}, weight decay {spec["weight_decay"]},
  {spec["warmup_steps"]} warm-up steps, cosine decay), batch {spec["batch_size"]}, {spec["epochs"]} epochs
  over {report["train_samples"]:,} samples (text facts x{spec.get("text_repeats", 1)}, the unrelated
  locality facts x{spec.get("locality_repeats", spec.get("text_repeats", 1))}; a training view
  other than the canonical one (view 0, the picture the cases show) is swapped for one of
  {spec.get("fresh_views", 0)} fresh views of its entity with probability {spec.get("fresh_share", 0)}),
  seed {spec["seed"]}; both stages
  {report["train_seconds"]} s on {report["torch_threads"]} CPU threads; final loss
  {report["final_loss"]}.

## Measured before any edit (teacher-forced, on the world's check sets)

| check | items | exact match % | token accuracy % |
|---|---|---|---|
{rows}

`recognition_unseen_views` uses image views never seen in training; `multihop_N` asks an
N-hop question about the entity in an image (the portability baseline).

## Targets

{_targets_section(report["checks"])}
"""


def _round_views(spec: dict[str, Any]) -> str:
    views, fresh = spec.get("vision_views", 0), spec.get("vision_fresh")
    if fresh is None or fresh == views:
        return f"{views} freshly drawn views"
    return f"{views} drawn views ({fresh} drawn for the round, the others for the rounds before)"


def _jitter_note(spec: dict[str, Any]) -> str:
    if not spec.get("vision_jitter"):
        return ""
    return (
        ";\n  each view is turned, scaled, shifted, tinted and specked again as it is fed"
        f" (at {spec['vision_jitter']} of the\n  ranges the world draws views with)"
    )


def _reuse_note(report: dict[str, Any]) -> str:
    if not report.get("vision_reused_from"):
        return ""
    return " (measured by the build whose tower this one reuses: same stage-1 recipe, `--vision-from`)"
