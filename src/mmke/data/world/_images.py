"""Writing every picture of the world: entity and sign views, user photos, scans."""

from __future__ import annotations

from pathlib import Path

from mmke.data.world._common import rng_for
from mmke.data.world._kg import VISUAL_TYPES
from mmke.data.world._medical import render_scan
from mmke.data.world._plan import World, entity_image, scan_image, user_image
from mmke.data.world._render import render_entity, render_sign, sample_view, save_png
from mmke.data.world._users import render_user_item


def write_images(world: World, out: Path) -> int:
    """Render and save all images under ``out``; returns how many were written."""
    size, seed, n = world.config.image_size, world.seed, 0
    for kind in VISUAL_TYPES:
        for e in world.kg.of_type(kind):
            for v in range(world.config.views):
                rng = rng_for(seed, "image", e.id, v)
                view = sample_view(rng, v)
                spec = world.kg.visual[e.id]
                img = (
                    render_sign(spec, view, size, rng)
                    if kind == "sign"
                    else render_entity(kind, spec, view, size, rng)
                )
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
