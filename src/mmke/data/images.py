"""Opening images of a benchmark safely: only inside its data root, with a clear error when one is bad."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from mmke.data.checks import FieldError, check_image_path, decode_image
from mmke.errors import BadRecordError
from mmke.types import ImageRef


@dataclass
class ImageStore:
    """Opens ``ImageRef``s under ``root`` as RGB PIL images, keeping the most recent ones decoded.

    The cache is per store (one per run), so probes that share an image decode it once.
    """

    root: Path
    capacity: int = 4096
    _cache: dict[str, Image.Image] = field(default_factory=dict, repr=False)

    def open(self, ref: ImageRef) -> Image.Image:
        img = self._cache.get(ref.path)
        if img is not None:
            return img
        why = check_image_path(ref.path, self.root)
        if why:
            raise BadRecordError(f"{self.root}: {why}")
        img = _decode(self.root / ref.path)
        if len(self._cache) >= self.capacity:
            self._cache.pop(next(iter(self._cache)))
        self._cache[ref.path] = img
        return img


def _decode(path: Path) -> Image.Image:
    try:
        return decode_image(path)
    except FieldError as e:
        raise BadRecordError(f"{path}: {e}") from None
