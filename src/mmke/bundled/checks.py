"""What the world model measures on the world's check sets, and what it should reach before any edit."""

from __future__ import annotations

from pathlib import Path

from mmke.data.images import ImageStore
from mmke.data.schema import read_samples
from mmke.models.base import LVLM

#: What the world model should reach before any edit (exact match), per check set.
TARGETS = {
    "recognition_train_views": 0.95,
    "recognition_unseen_views": 0.90,
    "facts_by_name": 0.95,
    "locality_facts": 0.95,
}


def evaluate_checks(lvlm: LVLM, world: Path, batch_size: int = 128) -> dict[str, dict[str, float]]:
    """Exact match and token accuracy of the model on each of the world's check sets.

    Binds ``lvlm`` to the world's images: the checks ask about the pictures as drawn, whatever
    stand-in (training's fresh views) it read before.
    """
    lvlm.bind_images(ImageStore(world))
    out: dict[str, dict[str, float]] = {}
    for check in sorted((world / "checks").glob("*.jsonl")):
        samples = read_samples(check)
        scored = lvlm.score(samples, batch_size=batch_size)
        out[check.stem] = {
            "n": len(samples),
            "exact_match": sum(scored.exact_match) / max(1, len(samples)),
            "token_accuracy": sum(scored.token_accuracy) / max(1, len(samples)),
        }
    return out
