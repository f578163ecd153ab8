"""The world: a generated multimodal knowledge-editing benchmark with a ground-truth knowledge graph.

``build_world(out, seed)`` writes a deterministic benchmark (VLKEB-style visual entity edits with
multi-hop portability, MMKE-Bench's visual semantic and user-specific edits, a MedMKEB-like
medical MCQ slice), the training corpus of the world model and its pre-edit checks.
Its build steps (``steps``) and its benchmark reader (``benchmark``: ``world[:SEED]``) register
themselves from here.
"""

from mmke.data.world._build import load_kg, world_stats
from mmke.data.world._config import WorldConfig
from mmke.data.world._images import extra_views, visual_entities
from mmke.data.world._kg import RELATIONS, Entity, KnowledgeGraph, Relation, Triple
from mmke.data.world._plan import entity_image
from mmke.data.world._render import CANONICAL_VIEW, MAX_ANGLE, MAX_NOISE, MAX_SHIFT, MAX_TINT, SPECK
from mmke.data.world._templates import locality_facts
from mmke.data.world.benchmark import world_dir
from mmke.data.world.steps import build_world

__all__ = [
    "CANONICAL_VIEW",
    "MAX_ANGLE",
    "MAX_NOISE",
    "MAX_SHIFT",
    "MAX_TINT",
    "RELATIONS",
    "SPECK",
    "Entity",
    "KnowledgeGraph",
    "Relation",
    "Triple",
    "WorldConfig",
    "build_world",
    "entity_image",
    "extra_views",
    "load_kg",
    "locality_facts",
    "visual_entities",
    "world_dir",
    "world_stats",
]
