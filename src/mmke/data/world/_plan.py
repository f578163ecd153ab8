"""The planned world: KG, user items, scan combos, canonical paths, image layout and the eval/train split."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mmke.data.world._common import permuted, rng_for
from mmke.data.world._config import WorldConfig
from mmke.data.world._kg import ENTITY_EDIT_TYPES, KnowledgeGraph, canonical_paths
from mmke.data.world._kg_build import generate_kg
from mmke.data.world._medical import Combo, make_combos
from mmke.data.world._users import UserItem, make_user_items
from mmke.types import EditType, ImageRef

#: Types whose canonical paths the world asks about (visual subjects and portability starts).
PATH_TYPES = (*ENTITY_EDIT_TYPES, "sign", "meaning", "finding")


@dataclass(frozen=True, eq=False)
class World:
    """Everything the case, corpus and image writers share; pure data plus path helpers."""

    config: WorldConfig
    seed: int
    kg: KnowledgeGraph
    users: tuple[UserItem, ...]
    combos: tuple[Combo, ...]
    paths: dict[str, tuple[tuple[str, ...], ...]]
    eval_subjects: dict[EditType, tuple[str, ...]]
    train_subjects: dict[EditType, tuple[str, ...]]
    _eval_set: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_eval_set", frozenset(s for ss in self.eval_subjects.values() for s in ss))

    def is_eval_subject(self, subject: str) -> bool:
        return subject in self._eval_set

    def templates_for(self, subject: str) -> tuple[int, ...]:
        """Template indices the corpus may use with ``subject`` (the held-out one only for non-eval ones)."""
        return (0, 1, 2) if self.is_eval_subject(subject) else (0, 1, 2, 3)

    @property
    def train_views(self) -> tuple[int, ...]:
        return tuple(range(self.config.train_views))

    @property
    def held_out_views(self) -> tuple[int, ...]:
        return tuple(range(self.config.train_views, self.config.views))

    @property
    def train_scans(self) -> tuple[int, ...]:
        return tuple(range(self.config.scan_train_images))

    @property
    def held_out_scans(self) -> tuple[int, ...]:
        return tuple(range(self.config.scan_train_images, self.config.scan_images))

    def combo(self, combo_id: str) -> Combo:
        return next(c for c in self.combos if c.id == combo_id)

    def user(self, uid: str) -> UserItem:
        return next(u for u in self.users if u.id == uid)

    def finding_id(self, name: str) -> str:
        return next(e.id for e in self.kg.of_type("finding") if e.name == name)


def entity_image(eid: str, view: int) -> ImageRef:
    return ImageRef(f"images/entity/{eid}/v{view:02d}.png")


def user_image(uid: str, view: int) -> ImageRef:
    return ImageRef(f"images/user/{uid}/v{view:02d}.png")


def scan_image(combo_id: str, k: int) -> ImageRef:
    return ImageRef(f"images/scan/{combo_id}/i{k:02d}.png")


def plan_world(config: WorldConfig, seed: int) -> World:
    """Generate the KG and the other subjects, then split subjects into eval and train (disjoint)."""
    kg, pool = generate_kg(config, seed)
    users = make_user_items(config.user_items, rng_for(seed, "users"), pool)
    combos = make_combos(config.modalities, config.body_parts, config.findings)
    paths = {kind: canonical_paths(kind, config.paths_per_hop) for kind in PATH_TYPES}
    pools = {
        EditType.VISUAL_ENTITY: [e.id for kind in ENTITY_EDIT_TYPES for e in kg.of_type(kind)],
        EditType.VISUAL_SEMANTIC: [e.id for e in kg.of_type("sign")],
        EditType.USER_SPECIFIC: [u.id for u in users],
        EditType.MEDICAL_MCQ: [c.id for c in combos],
    }
    n_eval = {
        EditType.VISUAL_ENTITY: config.eval_visual_entity,
        EditType.VISUAL_SEMANTIC: config.eval_visual_semantic,
        EditType.USER_SPECIFIC: config.eval_user_specific,
        EditType.MEDICAL_MCQ: config.eval_medical,
    }
    eval_s, train_s = {}, {}
    for et, ids in pools.items():
        order = permuted(rng_for(seed, "split", et.value), ids)
        eval_s[et], train_s[et] = tuple(order[: n_eval[et]]), tuple(order[n_eval[et] :])
    return World(config, seed, kg, users, combos, paths, eval_s, train_s)


def train_slots(subjects: tuple[str, ...], n: int) -> list[tuple[str, int]]:
    """``n`` (subject, round) training slots, cycling over subjects round by round."""
    if not subjects:
        return []
    rounds = math.ceil(n / len(subjects))
    return [(s, r) for r in range(rounds) for s in subjects][:n]
