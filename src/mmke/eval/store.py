"""The results store: one directory per run with its resolved config, append-only case records, a summary.

``runs/<id>/config.yaml`` + ``config_hash``, ``cases.jsonl`` (one canonical JSON line per case,
fsync'd before ``append`` returns, so a kill loses at most the case in flight) and
``summary.json`` (replaced atomically). ``done_keys`` lets ``--resume`` skip finished cases.
A process that writes a run holds an exclusive OS lock on ``runs/<id>/.lock`` for the run's whole
life (``RunStore.locked``); the OS drops it on any exit, kill -9 included. Readers (report,
compare) take no lock.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mmke.data.schema import Problem, dumps_line
from mmke.errors import BadRecordError, ConfigError, MmkeError
from mmke.eval.records import CaseRecord, ResumeKey, RunSummary
from mmke.io import fsync_dir, write_atomic

try:  # POSIX; elsewhere a run folder has no writer lock
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

CONFIG_FILE = "config.yaml"
HASH_FILE = "config_hash"
CASES_FILE = "cases.jsonl"
SUMMARY_FILE = "summary.json"
SKIPPED_FILE = "skipped.jsonl"
LOCK_FILE = ".lock"


def plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as JSON-native data (tuples -> lists), the form that is saved and hashed."""
    return json.loads(dumps_line(dict(config)))


def config_hash(config: Mapping[str, Any]) -> str:
    """A short stable hash of a resolved config (its canonical JSON)."""
    return hashlib.sha256(dumps_line(plain_config(config)).encode()).hexdigest()[:16]


class RunLockedError(MmkeError):
    """Another process is writing this run folder."""


def _writable_dir(path: Path, fix: str) -> None:
    """A one-line error now, before any model is loaded, if nothing can be written in ``path``."""
    probe = path / f".write-test-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        why = "read-only" if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else e.strerror
        raise ConfigError(f"cannot write in {path} ({why}); {fix}") from None


def _new_run_dir(root: Path, digest: str) -> Path:
    """``<UTC timestamp>-<hash8>``, with a numeric suffix if two runs start in the same second."""
    stem = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{digest[:8]}"
    for n in range(1000):
        path = root / (stem if n == 0 else f"{stem}-{n}")
        try:
            path.mkdir()  # atomic: two processes never get the same directory
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"cannot create a run directory under {root}: too many runs named {stem}")


@dataclass
class RunStore:
    """A run directory; records go to ``cases.jsonl`` one line at a time."""

    path: Path
    config: dict[str, Any]
    config_hash: str
    _lock_fd: int | None = None

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def cases_path(self) -> Path:
        return self.path / CASES_FILE

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY_FILE

    @classmethod
    def create(cls, root: Path, run_id: str | None, config: Mapping[str, Any]) -> RunStore:
        """Start a run under ``root`` (``runs/``); refuses to reuse an existing run directory."""
        plain = plain_config(config)
        digest = config_hash(plain)
        if root.exists() and not root.is_dir():
            raise ConfigError(f"out={str(root)!r} is a file; out names the folder that holds run folders")
        root.mkdir(parents=True, exist_ok=True)
        _writable_dir(root, "choose another out= folder")
        if run_id is None:
            path = _new_run_dir(root, digest)
        else:
            if not run_id or "/" in run_id or "\\" in run_id or run_id in (".", ".."):
                raise ConfigError(f"bad run id {run_id!r}: use a plain directory name")
            path = root / run_id
            try:
                path.mkdir()
            except FileExistsError:
                raise ConfigError(f"run {path} already exists; resume it with --resume {path}") from None
        write_atomic(path / CONFIG_FILE, yaml.safe_dump(plain, sort_keys=True, allow_unicode=True))
        write_atomic(path / HASH_FILE, digest + "\n")
        (path / CASES_FILE).touch()
        fsync_dir(path)
        return cls(path, plain, digest)

    # ------------------------------------------------------------ the writer's lock

    @contextmanager
    def locked(self, *, discard_if_empty: bool = False) -> Iterator[RunStore]:
        """Hold the run's writer lock for the block; a second writer gets ``RunLockedError``.

        ``discard_if_empty``: a new run that failed before recording any case leaves no folder.
        """
        self.lock()
        try:
            yield self
        except BaseException:
            if discard_if_empty and not self.records() and not self.summary_path.exists():
                shutil.rmtree(self.path, ignore_errors=True)
            raise
        finally:
            self.unlock()

    def lock(self) -> None:
        if fcntl is None or self._lock_fd is not None:
            return
        _writable_dir(self.path, "make the run folder writable to resume it")
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise RunLockedError(
                f"run {self.path} is being written by another mmke process (pid {holder}); "
                "wait for it to finish or stop it, then resume"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the lock
            self._lock_fd = None

    @classmethod
    def open(cls, path: Path) -> RunStore:
        """Reopen a run for ``--resume``; the saved config is the one that counts."""
        from mmke.config import read_yaml

        cfg_file = path / CONFIG_FILE
        if not cfg_file.is_file():
            raise ConfigError(f"{path} is not an mmke run (no {CONFIG_FILE}); pass a directory under runs/")
        config = read_yaml(cfg_file)
        if not isinstance(config, dict):
            raise ConfigError(f"{cfg_file}: expected a mapping of settings")
        digest = config_hash(config)
        hash_file = path / HASH_FILE
        saved = hash_file.read_bytes().decode("ascii", "replace").strip() if hash_file.is_file() else digest
        if saved != digest:
            raise ConfigError(
                f"{cfg_file} was edited after the run started (hash {digest} != {saved}); "
                "start a new run instead of resuming"
            )
        return cls(path, config, digest)

    # ------------------------------------------------------------ records

    def append(self, record: CaseRecord) -> None:
        """Append one record as a canonical JSON line; durable (fsync'd) when this returns."""
        data = (record.to_json() + "\n").encode("utf-8")
        fd = os.open(self.cases_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            end = self._drop_torn_tail(fd)
            # One positioned write per record: a kill leaves at most one line without its newline.
            view = memoryview(data)
            while view:
                n = os.pwrite(fd, view, end)
                end += n
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _drop_torn_tail(fd: int) -> int:
        """Truncate a partial last line (a kill mid-write) and return the end offset."""
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return size
        keep = size
        chunk = 65536
        while keep > 0:  # scan back for the last newline
            start = max(0, keep - chunk)
            block = os.pread(fd, keep - start, start)
            nl = block.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            keep = start
        os.ftruncate(fd, keep)
        return keep

    def records(self) -> list[CaseRecord]:
        """Every complete record, in order; a torn last line (no newline) is ignored."""
        if not self.cases_path.is_file():
            return []
        raw = self.cases_path.read_bytes()
        complete = raw[: raw.rfind(b"\n") + 1]  # a line counts only once its newline is written
        try:
            text = complete.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecordError(f"{self.cases_path}: byte {e.start} is not UTF-8") from None
        lines = enumerate(text.split("\n"), 1)
        return [CaseRecord.from_json(line, f"{self.cases_path}:{n}") for n, line in lines if line.strip()]

    def done_keys(self) -> set[ResumeKey]:
        """Keys of every recorded case (ok, collapsed or error), so a resumed run skips them."""
        return {r.key for r in self.records()}

    def write_summary(self, summary: RunSummary) -> None:
        """Write ``summary.json`` atomically (temp file + rename): readers never see half a summary."""
        write_atomic(self.summary_path, summary.to_json())

    def write_skipped(self, problems: Sequence[Problem]) -> None:
        """``skipped.jsonl``: each benchmark record left out under ``skip_bad``, with its reason."""
        lines = [
            json.dumps({"file": p.file, "line": p.line, "case_id": p.case_id, "problem": p.message})
            for p in problems
        ]
        write_atomic(self.path / SKIPPED_FILE, "".join(line + "\n" for line in lines))

    def read_skipped(self) -> list[dict[str, Any]]:
        path = self.path / SKIPPED_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]

    def read_summary(self) -> RunSummary | None:
        if not self.summary_path.is_file():
            return None
        return RunSummary.from_json(self.summary_path.read_text(encoding="utf-8"), str(self.summary_path))
