"""The world as the construction pipeline's worked example: its build is a pipeline of these steps.

``mmke build world`` runs ``world_pipeline(seed)``; ``examples/pipelines/world.yaml`` spells
the same steps out, so both write the same bytes. The world's cases choose counterfactuals with
``counterfactual.assign``, ask multi-hop questions with ``multihop`` and attack edits with
``adversarial``: the steps every other pipeline uses.
"""

from __future__ import annotations

from typing import Any

from mmke.data.build.pipeline import Context, Pipeline, Step
from mmke.errors import ConfigError
from mmke.registry import register_step

#: The steps of a world build, in order (``world_plan`` takes the config overrides).
WORLD_STEPS = ("world_plan", "world_images", "world_cases", "world_corpus")


def world_pipeline(seed: int = 0, config: dict[str, Any] | None = None) -> Pipeline:
    """The pipeline ``build_world`` runs: plan (KG, users, scans, splits), images, cases, corpus."""
    first = Step("world_plan", {"config": dict(config)} if config else {})
    return Pipeline("world", (first, *(Step(name) for name in WORLD_STEPS[1:])), seed)


@register_step("world_plan")
def world_plan(ctx: Context, config: dict[str, Any] | None = None, preset: str = "default") -> None:
    """Plan the world: knowledge graph, visual identities, user items, scans and the eval/train split.

    ``preset`` is ``default`` or ``small``; ``config`` overrides single WorldConfig fields.
    """
    from mmke.data.world._build import clear_owned
    from mmke.data.world._config import DEFAULT_CONFIG, WorldConfig
    from mmke.data.world._plan import plan_world

    presets = {"default": DEFAULT_CONFIG, "small": WorldConfig.small()}
    if preset not in presets:
        raise ConfigError(f"step 'world_plan': unknown preset {preset!r} (default, small)")
    cfg = WorldConfig.from_json({**presets[preset].to_json(), **(config or {})})
    cfg.validate()
    if not isinstance(ctx.seed, int) or ctx.seed < 0:
        raise ConfigError(f"world seed must be a non-negative integer, got {ctx.seed!r}")
    clear_owned(ctx.out)
    ctx.artifacts["world"] = plan_world(cfg, ctx.seed)


@register_step("world_images")
def world_images(ctx: Context) -> None:
    """Draw every view of every visual entity, user item and scan into ``OUT/images``."""
    from mmke.data.world._images import write_images

    write_images(_world(ctx), ctx.out)


@register_step("world_cases")
def world_cases(ctx: Context) -> None:
    """The eval and train cases of the four edit types (``cases_eval.jsonl``, ``cases_train.jsonl``)."""
    from mmke.data.schema import write_cases
    from mmke.data.world._cases import build_cases

    world = _world(ctx)
    cases = {split: build_cases(world, split) for split in ("eval", "train")}
    for split, cs in cases.items():
        write_cases(
            ctx.out / f"cases_{split}.jsonl", cs, {"benchmark": "world", "seed": world.seed, "split": split}
        )
    ctx.artifacts["cases"] = cases


@register_step("world_corpus")
def world_corpus(ctx: Context) -> None:
    """The world model's training corpus, its pre-edit checks, ``world.json`` and the vocabulary."""
    from mmke.data.world._build import write_corpus

    if "cases" not in ctx.artifacts:
        raise ConfigError("step 'world_corpus' needs the cases: run 'world_cases' before it")
    write_corpus(_world(ctx), ctx.artifacts["cases"], ctx.out)


def _world(ctx: Context) -> Any:
    if "world" not in ctx.artifacts:
        raise ConfigError("the world steps need a planned world: run 'world_plan' first")
    return ctx.artifacts["world"]
