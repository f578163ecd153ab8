"""The ``mmke`` command line: the only place that configures logging and prints for people."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mmke.errors import MmkeError

log = logging.getLogger("mmke")


def _print_stats(console: Console, stats: dict, title: str) -> None:
    """Render a world-stats dict (nested counts) as one table per section."""
    for section, value in stats.items():
        if isinstance(value, dict):
            table = Table(title=f"{title}: {section}", show_header=False)
            for key, count in value.items():
                table.add_row(str(key), json.dumps(count) if isinstance(count, dict | list) else str(count))
            console.print(table)
        else:
            console.print(f"{section}: {value}")


def cmd_build_world(args: argparse.Namespace, console: Console) -> int:
    from mmke.data.world import build_world, world_stats

    if args.stats and args.out.is_dir() and (args.out / "world.json").is_file() and not args.force:
        stats = world_stats(args.out)
    else:
        console.print(f"building the world (seed {args.seed}) into {args.out} …")
        args.out.mkdir(parents=True, exist_ok=True)
        stats = build_world(args.out, seed=args.seed)
    if args.stats:
        _print_stats(console, stats, "world")
    else:
        console.print(f"wrote {args.out}: {stats.get('cases', '')}")
    return 0


def cmd_validate(args: argparse.Namespace, console: Console) -> int:
    from mmke.data.schema import validate

    problems = validate(args.file, args.image_root if args.image_root else args.file.parent)
    for p in problems:
        console.print(str(p), markup=False, highlight=False, soft_wrap=True)
    if problems:
        console.print(f"{len(problems)} problem(s) in {args.file}")
        return 1
    console.print(f"{args.file}: ok")
    return 0


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    from mmke import registry

    kinds = {
        "benchmarks": registry.benchmarks,
        "models": registry.model_families,
        "methods": registry.methods,
    }
    for kind in [args.what] if args.what else list(kinds):
        table = Table(title=kind)
        table.add_column("name")
        table.add_column("what it is")
        try:
            for name, help_ in kinds[kind].describe():
                table.add_row(name, escape(help_))
        except ModuleNotFoundError as e:  # a kind whose package has not been written yet
            log.debug("no %s registered: %s", kind, e)
        console.print(table)
    return 0


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    """The main job. Until the evaluation engine lands: build/load the world and show its stats."""
    from mmke.data.benchmark import load_benchmark

    bench = load_benchmark(args.benchmark)
    console.print(
        f"benchmark {bench.name} ({bench.version}): {len(bench.cases)} eval cases, "
        f"{len(bench.train_cases)} train cases, images under {bench.image_root}"
    )
    if bench.name == "world" and bench.image_root is not None:
        from mmke.data.world import world_stats

        _print_stats(console, world_stats(bench.image_root), "world")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmke", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the main job: edit and evaluate (default: the embedded world)")
    run.add_argument("--benchmark", default="world", help="name[:arg], e.g. world, world:3, native:FILE")
    run.set_defaults(func=cmd_run)

    lst = sub.add_parser("list", help="registered benchmarks, model families, methods")
    lst.add_argument("what", nargs="?", choices=["benchmarks", "models", "methods"])
    lst.set_defaults(func=cmd_list)

    build = sub.add_parser("build", help="build benchmarks and artefacts")
    bsub = build.add_subparsers(dest="target", required=True)
    world = bsub.add_parser("world", help="generate the world benchmark (deterministic from --seed)")
    world.add_argument("--out", type=Path, default=Path("out/world"))
    world.add_argument("--seed", type=int, default=0)
    world.add_argument("--stats", action="store_true", help="print counts per type, edit type, kind, hop")
    world.add_argument("--force", action="store_true", help="rebuild even if --out holds a world")
    world.set_defaults(func=cmd_build_world)

    val = sub.add_parser("validate", help="check a native case file; print file:line (case): problem")
    val.add_argument("file", type=Path)
    val.add_argument("--image-root", type=Path, default=None)
    val.set_defaults(func=cmd_validate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    console = Console()
    func: Callable[[argparse.Namespace, Console], int] = args.func
    try:
        return func(args, console)
    except MmkeError as e:
        print(f"mmke: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"mmke: error: {e.strerror}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmke: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
