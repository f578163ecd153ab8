"""The scale knobs of the generated world: entity counts, views, images and case counts per split."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from mmke.errors import ConfigError

#: Medical vocabulary sizes the renderer knows (modalities, body parts, findings).
MAX_MODALITIES = 4
MAX_BODY_PARTS = 5
MAX_FINDINGS = 12
#: Owners x kinds of user-specific items (see ``_users``).
MAX_USER_ITEMS = 192
#: Signs need distinct meanings; five rule kinds of 16 meanings each.
MAX_SIGNS = 80
#: Film titles are adjective x noun pairs from fixed lists (see ``_vocab``).
MAX_FILMS = 144


@dataclass(frozen=True)
class WorldConfig:
    """How big the world is. ``WorldConfig()`` is the default benchmark, ``small()`` a fast test world."""

    people: int = 150
    films: int = 40
    organisations: int = 40
    animals: int = 40
    landmarks: int = 40
    cities: int = 60
    countries: int = 20
    languages: int = 12
    scripts: int = 6
    signs: int = 80
    user_items: int = 192
    modalities: int = 4
    body_parts: int = 5
    findings: int = 12
    views: int = 12
    train_views: int = 8
    user_views: int = 4
    scan_images: int = 6
    scan_train_images: int = 4
    image_size: int = 64
    paths_per_hop: int = 2
    portability_per_hop: int = 1
    text_locality_per_case: int = 2
    eval_visual_entity: int = 180
    eval_visual_semantic: int = 40
    eval_user_specific: int = 40
    eval_medical: int = 60
    #: MultiMedEdit's reasoning task on the first of the eval scans (the medical cases are its
    #: understanding task): what the scan calls for, the finding plus one step of medical knowledge.
    eval_medical_reasoning: int = 24
    train_visual_entity: int = 660
    train_visual_semantic: int = 160
    train_user_specific: int = 152
    train_medical: int = 180

    @classmethod
    def small(cls) -> WorldConfig:
        """A world that builds in about two seconds, for tests (not the issue's counts)."""
        return cls(
            people=24,
            films=8,
            organisations=8,
            animals=8,
            landmarks=8,
            cities=12,
            countries=6,
            languages=4,
            scripts=3,
            signs=16,
            user_items=24,
            modalities=2,
            body_parts=2,
            findings=6,
            views=6,
            train_views=4,
            user_views=3,
            scan_images=3,
            scan_train_images=2,
            eval_visual_entity=12,
            eval_visual_semantic=6,
            eval_user_specific=6,
            eval_medical=6,
            eval_medical_reasoning=3,
            train_visual_entity=30,
            train_visual_semantic=12,
            train_user_specific=10,
            train_medical=10,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorldConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown world config keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def validate(self) -> None:
        """Raise ConfigError naming the first knob that cannot produce a consistent world."""
        for why in _problems(self):
            raise ConfigError(f"WorldConfig: {why}")


def _problems(c: WorldConfig) -> list[str]:
    out = [f"{f.name} must be a positive integer" for f in fields(c) if getattr(c, f.name) < 1]
    ve_subjects = c.people + c.films + c.organisations + c.animals + c.landmarks
    combos = c.modalities * c.body_parts * c.findings
    checks = [
        (c.train_views < c.views, "train_views must be smaller than views (held-out views are needed)"),
        (c.scan_train_images < c.scan_images, "scan_train_images must be smaller than scan_images"),
        (c.user_views >= 2, "user_views must be at least 2 (edit view + generality view)"),
        (c.modalities <= MAX_MODALITIES, f"modalities must be <= {MAX_MODALITIES}"),
        (c.body_parts <= MAX_BODY_PARTS and c.body_parts >= 2, f"body_parts must be 2..{MAX_BODY_PARTS}"),
        (5 <= c.findings <= MAX_FINDINGS, f"findings must be 5..{MAX_FINDINGS} (4 options + a spare)"),
        (c.signs <= MAX_SIGNS and c.signs >= 6, f"signs must be 6..{MAX_SIGNS}"),
        (c.user_items <= MAX_USER_ITEMS, f"user_items must be <= {MAX_USER_ITEMS}"),
        (c.cities >= c.countries, "cities must be >= countries (every country needs a capital)"),
        (c.countries >= c.languages, "countries must be >= languages (every language is official somewhere)"),
        (c.languages >= c.scripts, "languages must be >= scripts (every script writes some language)"),
        (c.image_size >= 32, "image_size must be at least 32"),
        (min(c.people, c.films, c.organisations, c.animals, c.landmarks) >= 4, "each entity type needs >= 4"),
        (c.films <= MAX_FILMS, f"films must be <= {MAX_FILMS} (adjective x noun titles)"),
        (c.eval_visual_entity < ve_subjects, "eval_visual_entity must leave some entities for training"),
        (c.eval_visual_semantic < c.signs, "eval_visual_semantic must be smaller than signs"),
        (
            c.eval_user_specific + c.train_user_specific <= c.user_items,
            "user-specific cases exceed user_items",
        ),
        (c.eval_medical < combos, "eval_medical must be smaller than modalities x body_parts x findings"),
        (c.eval_medical_reasoning <= c.eval_medical, "eval_medical_reasoning must be <= eval_medical"),
    ]
    out.extend(why for ok, why in checks if not ok)
    return out


#: The default benchmark's configuration (a frozen constant, safe as a default argument).
DEFAULT_CONFIG = WorldConfig()
