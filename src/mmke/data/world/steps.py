"""The world as the construction pipeline's worked example: its build is a pipeline of these steps.

``mmke build world`` runs ``world_pipeline(seed)``; ``examples/pipelines/world.yaml`` spells
the same steps out, so both write the same bytes. The world's cases choose counterfactuals with
``counterfactual.assign``, ask multi-hop questions with ``multihop`` and attack edits with
``adversarial`` (``mmke.data.kg``): the mechanisms every other pipeline's steps use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmke.data.build.pipeline import Context, Pipeline, Step, run_pipeline
from mmke.data.schema import write_cases
from mmke.data.world._build import clear_owned, world_stats, write_corpus
from mmke.data.world._cases import build_cases
from mmke.data.world._config import DEFAULT_CONFIG, WorldConfig
from mmke.data.world._images import write_images
from mmke.data.world._plan import plan_world
from mmke.errors import ConfigError
from mmke.registry import register_step

#: The steps of a world build, in order (``world_plan`` takes the config overrides).
WORLD_STEPS = ("world_plan", "world_images", "world_cases", "world_corpus")


def world_pipeline(seed: int = 0, config: dict[str, Any] | None = None) -> Pipeline:
    """The pipeline ``build_world`` runs: plan (KG, users, scans, splits), images, cases, corpus."""
    first = Step("world_plan", {"config": dict(config)} if config else {})
    return Pipeline("world", (first, *(Step(name) for name in WORLD_STEPS[1:])), seed)


def build_world(out: Path, seed: int = 0, config: WorldConfig = DEFAULT_CONFIG) -> dict[str, Any]:
    """Write the world for ``seed`` and ``config`` into ``out``; returns ``world_stats(out)``.

    Same seed and config give byte-identical files. Files a previous build wrote there are
    replaced (other files in ``out`` are left alone). The build is ``world_pipeline`` (what
    ``examples/pipelines/world.yaml`` spells out).
    """
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"world seed must be a non-negative integer, got {seed!r}")
    overrides = {k: v for k, v in config.to_json().items() if DEFAULT_CONFIG.to_json()[k] != v}
    run_pipeline(world_pipeline(seed, overrides), Path(out))
    return world_stats(out)


@register_step("world_plan")
def world_plan(ctx: Context, config: dict[str, Any] | None = None, preset: str = "default") -> None:
    """Plan the world: knowledge graph, visual identities, user items, scans and the eval/train split.

    ``preset`` is ``default`` or ``small``; ``config`` overrides single WorldConfig fields.
    """
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
    write_images(_world(ctx), ctx.out)


@register_step("world_cases")
def world_cases(ctx: Context) -> None:
    """The eval and train cases of the four edit types (``cases_eval.jsonl``, ``cases_train.jsonl``)."""
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
    if "cases" not in ctx.artifacts:
        raise ConfigError("step 'world_corpus' needs the cases: run 'world_cases' before it")
    write_corpus(_world(ctx), ctx.artifacts["cases"], ctx.out)


def _world(ctx: Context) -> Any:
    if "world" not in ctx.artifacts:
        raise ConfigError("the world steps need a planned world: run 'world_plan' first")
    return ctx.artifacts["world"]
