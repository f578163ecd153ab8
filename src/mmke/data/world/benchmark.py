"""The embedded default benchmark: the generated world, built once into the cache (``world[:SEED]``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmke.cache import cache_dir, materialize
from mmke.data.benchmark import Benchmark
from mmke.data.formats._foreign import take_options
from mmke.data.schema import read_cases
from mmke.data.world.steps import build_world
from mmke.errors import ConfigError
from mmke.registry import register_benchmark

#: Bump when the generator's output changes, so cached worlds are rebuilt rather than reused.
WORLD_VERSION = "3"


def world_dir(seed: int = 0, cache: Path | None = None) -> Path:
    """The built world for ``seed``, built into the cache on first use (the build is deterministic)."""
    out = cache_dir(cache) / "world" / f"v{WORLD_VERSION}-seed{seed}"
    return materialize(out, lambda tmp: build_world(tmp, seed=seed), {"world": WORLD_VERSION, "seed": seed})


def _seed(spec: str | None) -> int:
    if not spec:
        return 0
    try:
        return int(spec)
    except ValueError:
        raise ConfigError(f"benchmark 'world' takes a seed (world:0), got {spec!r}") from None


@register_benchmark("world", help="the generated world (embedded default): world[:SEED]")
def load_world(
    spec: str | None = None, image_root: Path | None = None, skip_bad: bool = False, **options: Any
) -> Benchmark:
    take_options("world", options, ())
    if image_root is not None:
        raise ConfigError(
            f"benchmark 'world' draws its own pictures into the cache; image_root={str(image_root)!r} "
            "is not used by it: remove the setting"
        )
    root = world_dir(_seed(spec))
    # The world's pictures were drawn by this package into a build that is published only whole
    # (``materialize``); paths are still checked, and a picture that fails to open at run time is
    # a one-line error, so decoding 6,888 of them again would only add a second to every start.
    return Benchmark(
        name="world",
        version=f"world-v{WORLD_VERSION}-seed{_seed(spec)}",
        cases=tuple(read_cases(root / "cases_eval.jsonl", root, decode_images=False)),
        image_root=root,
        train_cases=tuple(read_cases(root / "cases_train.jsonl", root, decode_images=False)),
    )
