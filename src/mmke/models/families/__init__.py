"""Model families: one module per family, each registering itself with ``@register_family``.

The registry imports every public module here on first lookup; ``Family`` is the shared base.
"""

from mmke.models.families._base import OWN_FORMAT, Encoded, Family, LayoutSpec, PromptFormat

__all__ = ["OWN_FORMAT", "Encoded", "Family", "LayoutSpec", "PromptFormat"]
