"""Reader for mmke's own JSONL case files (``native:path/to/cases.jsonl``)."""

from __future__ import annotations

from pathlib import Path

from mmke.data.benchmark import Benchmark
from mmke.data.schema import read_cases, read_header
from mmke.errors import ConfigError
from mmke.registry import register_benchmark


@register_benchmark("native", help="mmke's own JSONL case files: native:FILE [image_root=DIR]")
def load_native(path: str | None, image_root: Path | None = None, train: str | None = None) -> Benchmark:
    if not path:
        raise ConfigError("benchmark 'native' needs a file: native:path/to/cases.jsonl")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"benchmark file {file} not found")
    root = image_root if image_root is not None else file.parent
    head = read_header(file)
    train_cases = tuple(read_cases(Path(train), root)) if train else ()
    return Benchmark(
        name=str(head.get("benchmark", file.stem)),
        version=f"native-v{head['version']}",
        cases=tuple(read_cases(file, root)),
        image_root=root,
        train_cases=train_cases,
    )
