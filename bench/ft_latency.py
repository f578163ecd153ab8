"""Edit latency of a 10-step FT-LLM edit on the bundled world model (issue goal: < 1 s per edit, 2 CPU cores).

Run: ``.venv/bin/python bench/ft_latency.py [N_CASES]``. Prints the mean, min and max wall time
of ``ft_llm`` edits (10 steps, last decoder layer MLP) and of restoring them.
"""

from __future__ import annotations

import statistics
import sys
import time

from mmke.data.benchmark import load_benchmark
from mmke.data.images import ImageStore
from mmke.models import LVLM
from mmke.registry import methods


def main(n: int = 20) -> None:
    bench = load_benchmark("world")
    model = LVLM.load("world", images=ImageStore(bench.image_root))
    editor = methods.get("ft_llm")({"steps": 10})
    edits, restores = [], []
    for case in bench.cases[:n]:
        start = time.perf_counter()
        edited = editor.apply(model, case)
        edits.append(time.perf_counter() - start)
        start = time.perf_counter()
        edited.restore()
        restores.append(time.perf_counter() - start)
    print(f"ft_llm, 10 steps, {n} cases, {edited.edited_params:,} edited params")
    print(f"edit    mean {statistics.mean(edits):.3f} s  min {min(edits):.3f}  max {max(edits):.3f}")
    print(f"restore mean {statistics.mean(restores) * 1000:.2f} ms")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
