"""Where mmke keeps what it derives once and reuses (the built world, converted models, statistics)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Written last into a built directory; its stamp must match for the directory to be reused.
MARKER = ".mmke-complete.json"


def cache_dir(override: Path | str | None = None) -> Path:
    """``override``, else ``$MMKE_CACHE``, else ``~/.cache/mmke``; created on first use."""
    path = Path(override or os.environ.get("MMKE_CACHE") or Path.home() / ".cache" / "mmke")
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_complete(out_dir: Path, stamp: dict[str, Any]) -> bool:
    """Whether ``out_dir`` holds a finished build whose marker records ``stamp``."""
    try:
        marker = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and all(marker.get(k) == v for k, v in stamp.items())


def materialize(out_dir: Path, build: Callable[[Path], None], stamp: dict[str, Any]) -> Path:
    """Build ``out_dir`` once with ``build(tmp)``, atomically; reuse it while its stamp matches.

    The build runs in a temporary sibling that is renamed into place only when finished and
    marked, so an interrupted build never leaves a half directory where a finished one belongs.
    """
    if is_complete(out_dir, stamp):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        build(tmp)
        _share(tmp)
        (tmp / MARKER).write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n")
        if out_dir.exists():  # stale or half-written leftover: move aside first (rename needs a free name)
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not is_complete(out_dir, stamp):  # lost a race to another builder: fine if it finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _share(tmp: Path) -> None:
    """Give the finished directory the usual umask permissions (mkdtemp and safetensors use 0700/0600)."""
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    for path in tmp.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)
