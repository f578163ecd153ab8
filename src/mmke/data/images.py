"""Opening images of a benchmark safely: only inside its data root, with a clear error when one is bad."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mmke.data.schema import check_image_path
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
        with Image.open(path) as im:
            im.load()  # force a full decode so truncated files fail here, not mid-batch
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadRecordError(f"{path}: image is corrupt or unreadable ({type(e).__name__}: {e})") from None
