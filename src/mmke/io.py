"""Atomic file writes: readers see the old file or the new one, never half of one.

Every file mmke replaces in place (a run's config and summary, cached statistics and embeddings,
editor checkpoints, the build pipeline's drafts, review files) goes through ``atomic_path``:
write a temporary sibling, fsync it, rename it over the target, fsync the folder so the rename
itself survives a power cut; on any failure (a full disk) the temporary file is removed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a new or renamed entry in ``path`` durable (not supported everywhere, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path | str, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (torch.save,
    safetensors, np.save); when the block ends it replaces ``path`` durably, or is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(mode)  # mkstemp creates 0600; these files are shared like any other output
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_atomic(path: Path | str, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` (text is written as UTF-8 with ``\\n`` line ends)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
