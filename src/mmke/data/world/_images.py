"""Writing every picture of the world: entity and sign views, user photos, scans."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from mmke.data.world._common import rng_for
from mmke.data.world._config import WorldConfig
from mmke.data.world._kg import VISUAL_TYPES
from mmke.data.world._medical import render_scan
from mmke.data.world._plan import World, entity_image, plan_world, scan_image, user_image
from mmke.data.world._render import render_entity, render_sign, sample_view, save_png
from mmke.data.world._users import render_user_item


def write_images(world: World, out: Path) -> int:
    """Render and save all images under ``out``; returns how many were written."""
    size, seed, n = world.config.image_size, world.seed, 0
    for kind in VISUAL_TYPES:
        for e in world.kg.of_type(kind):
            for v in range(world.config.views):
                img = _entity_view(world, kind, e.id, v, rng_for(seed, "image", e.id, v))
                save_png(img, out / entity_image(e.id, v).path)
                n += 1
    for u in world.users:
        for v in range(world.config.user_views):
            rng = rng_for(seed, "image", u.id, v)
            save_png(render_user_item(u.spec, sample_view(rng, v), size, rng), out / user_image(u.id, v).path)
            n += 1
    for c in world.combos:
        for k in range(world.config.scan_images):
            rng = rng_for(seed, "image", c.id, k)
            save_png(render_scan(c, sample_view(rng, k + 1), size, rng), out / scan_image(c.id, k).path)
            n += 1
    return n


def _entity_view(world: World, kind: str, eid: str, v: int, rng: np.random.Generator) -> Image.Image:
    view, spec, size = sample_view(rng, v), world.kg.visual[eid], world.config.image_size
    if kind == "sign":
        return render_sign(spec, view, size, rng)
    return render_entity(kind, spec, view, size, rng)


def visual_entities(root: Path) -> list[str]:
    """Ids of the built world's visual entities (signs included), in a fixed order."""
    world = _plan_from(root)
    return [e.id for kind in VISUAL_TYPES for e in world.kg.of_type(kind)]


def extra_views(root: Path, round_: int, per_entity: int) -> Iterator[tuple[str, Image.Image]]:
    """``per_entity`` fresh views of every visual entity of the world built at ``root``.

    For training the world model's vision (augmentation): drawn like the benchmark's views but
    from their own random stream (tagged by ``round_``), so they never coincide with the
    held-out views that the recognition checks use.
    """
    world = _plan_from(root)
    for kind in VISUAL_TYPES:
        for e in world.kg.of_type(kind):
            for k in range(per_entity):
                rng = rng_for(world.seed, "extra-view", round_, e.id, k)
                yield e.id, _entity_view(world, kind, e.id, 1 + k, rng)


def _plan_from(root: Path) -> World:
    head = json.loads((root / "world.json").read_text(encoding="utf-8"))
    return plan_world(WorldConfig.from_json(head["config"]), int(head["seed"]))
