"""Reader for mmke's own JSONL case files (``native:path/to/cases.jsonl``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmke.data.benchmark import Benchmark
from mmke.data.formats._foreign import Decoded, benchmark_file, make_benchmark, take_options
from mmke.data.schema import Problem, iter_validated, read_header
from mmke.registry import register_benchmark


def _decode(path: Path, root: Path) -> Decoded:
    cases, problems = [], []
    for x in iter_validated(path, root):
        (problems if isinstance(x, Problem) else cases).append(x)
    return Decoded(tuple(cases), tuple(problems))  # type: ignore[arg-type]


def _header_root(file: Path, head: dict[str, Any]) -> Path:
    """Where the file's image paths point: ``image_root`` in its header (``mmke convert`` writes it,
    relative to the file), else the file's own folder."""
    given = head.get("image_root")
    return file.parent / given if isinstance(given, str) and given else file.parent


@register_benchmark("native", help="mmke's own JSONL case files: native:FILE (option: train=FILE)")
def load_native(
    path: str | None, image_root: Path | None = None, skip_bad: bool = False, **options: Any
) -> Benchmark:
    opts = take_options("native", options, ("train",))
    file = benchmark_file("native", path, "path/to/cases.jsonl")
    head = read_header(file)
    root = image_root if image_root is not None else _header_root(file, head)
    train = _decode(Path(opts["train"]), root) if opts.get("train") else None
    bench = make_benchmark("native", file, _decode(file, root), root, skip_bad=skip_bad, train=train)
    return Benchmark(
        name=str(head.get("benchmark", file.stem)),
        version=f"native-v{head['version']}",
        cases=bench.cases,
        image_root=root,
        train_cases=bench.train_cases,
        skipped=bench.skipped,
    )
