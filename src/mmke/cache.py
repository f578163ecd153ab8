"""Where mmke keeps what it derives once and reuses (the built world, converted models, statistics)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(override: Path | str | None = None) -> Path:
    """``override``, else ``$MMKE_CACHE``, else ``~/.cache/mmke``; created on first use."""
    path = Path(override or os.environ.get("MMKE_CACHE") or Path.home() / ".cache" / "mmke")
    path.mkdir(parents=True, exist_ok=True)
    return path
