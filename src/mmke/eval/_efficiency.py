"""Per-case cost: wall time and peak memory (RSS on CPU, the CUDA allocator's peak on GPU)."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


@dataclass
class Meter:
    """Filled in when the ``measure`` block ends."""

    seconds: float = 0.0
    peak_mb: float = 0.0


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with suppress(OSError):  # Linux: writing 5 resets the process's peak RSS (VmHWM) to its current RSS
        _CLEAR_REFS.write_text("5")


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # lifetime peak: an upper bound


@contextmanager
def measure(device: torch.device) -> Iterator[Meter]:
    """Time the block and record the peak memory reached inside it."""
    meter = Meter()
    _reset_peak(device)
    start = time.perf_counter()
    try:
        yield meter
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        meter.seconds = time.perf_counter() - start
        meter.peak_mb = _peak_mb(device)
