"""Models: the ``LVLM`` wrapper (batched teacher-forced scoring, generation), families and edit-site layouts.

``LVLM.load(dir, images=store)`` loads a saved HF model offline, bound to where its items' images
are; ``model.score(items)`` scores prompt -> target items in batches; ``model.layout`` names edit
sites by role.
"""

from mmke.models.base import LVLM, ImageSource, Item, ModalityError
from mmke.models.batch import Batch
from mmke.models.families import Encoded, Family, LayoutSpec
from mmke.models.layout import Layout, LayoutError
from mmke.models.scoring import ItemScore, ScoredBatch, score_answers

__all__ = [
    "LVLM",
    "Batch",
    "Encoded",
    "Family",
    "ImageSource",
    "Item",
    "ItemScore",
    "Layout",
    "LayoutError",
    "LayoutSpec",
    "ModalityError",
    "ScoredBatch",
    "score_answers",
]
