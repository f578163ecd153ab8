"""Models: the ``LVLM`` wrapper (batched teacher-forced scoring, generation), families and edit-site layouts.

``LVLM.load(dir)`` loads a saved HF model offline; ``model.score(items, images)`` scores
prompt -> target items in batches; ``model.layout`` names edit sites by role.
"""

from mmke.models.base import LVLM, Item, ModalityError
from mmke.models.batch import Batch
from mmke.models.families import Encoded, Family
from mmke.models.layout import Layout, LayoutError, LayoutSpec
from mmke.models.scoring import ItemScore, ScoredBatch, score_answers

__all__ = [
    "LVLM",
    "Batch",
    "Encoded",
    "Family",
    "Item",
    "ItemScore",
    "Layout",
    "LayoutError",
    "LayoutSpec",
    "ModalityError",
    "ScoredBatch",
    "score_answers",
]
