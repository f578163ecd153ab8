"""The ``mmke`` command line: the only place that configures logging and prints for people."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mmke.errors import MmkeError

if TYPE_CHECKING:
    from mmke.config import RunConfig
    from mmke.data.benchmark import Benchmark
    from mmke.eval.executors import Executor
    from mmke.eval.records import RunSummary
    from mmke.eval.store import RunStore

log = logging.getLogger("mmke")


def _flat(value: object, prefix: str = "") -> list[tuple[str, str]]:
    """Nested counts as (dotted key, value) rows, so every table cell holds one number."""
    if not isinstance(value, dict):
        return [(prefix, str(value))]
    rows: list[tuple[str, str]] = []
    for key, sub in value.items():
        rows += _flat(sub, f"{prefix} / {key}" if prefix else str(key))
    return rows


def _print_stats(console: Console, stats: dict, title: str) -> None:
    """Render a world-stats dict (nested counts) as one table per section."""
    for section, value in stats.items():
        if isinstance(value, dict):
            table = Table(title=f"{title}: {section}", show_header=False)
            for key, count in _flat(value):
                table.add_row(key, count)
            console.print(table)
        else:
            console.print(f"{section}: {value}")


def _tiny_kinds() -> tuple[str, ...]:
    from mmke.models.tiny import TINY_KINDS

    return TINY_KINDS


def cmd_build_tiny_model(args: argparse.Namespace, console: Console) -> int:
    """Save the tiny random model the tests use for a family: a real transformers folder, offline."""
    from mmke.models.tiny import save_tiny, tiny_model

    if args.out.exists() and any(args.out.iterdir()):
        raise MmkeError(f"{args.out} is not empty: choose a new folder for the tiny model")
    lvlm = tiny_model(args.family, seed=args.seed)
    save_tiny(lvlm, args.out)
    n = sum(p.numel() for p in lvlm.model.parameters())
    (args.out / "README.md").write_text(
        f"# A tiny random {args.family} model\n\nBuilt by `mmke build tiny-model {args.family} --seed "
        f"{args.seed}`: {type(lvlm.model).__name__}, {n:,} parameters, random weights. It checks a "
        "set-up (loading, every method, the report) offline; its answers mean nothing.\n",
        encoding="utf-8",
    )
    console.print(
        f"wrote {args.out}: {args.family} ({type(lvlm.model).__name__}, {n:,} random parameters); "
        f"try: mmke run model={args.out} limit=2 methods=[ft_llm,ike]",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return 0


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


def cmd_build_pipeline(args: argparse.Namespace, console: Console) -> int:
    from mmke.data.build.pipeline import Pipeline, run_pipeline

    pipe = Pipeline.read(args.file)
    if args.seed is not None:
        pipe = replace(pipe, seed=args.seed)
    console.print(f"building {pipe.name!r} (seed {pipe.seed}, {len(pipe.steps)} steps) into {args.out} …")
    run_pipeline(pipe, args.out, progress=lambda name: console.print(f"  step {escape(name)}"))
    _print_build_outputs(console, args.out)
    return 0


def cmd_build_step(args: argparse.Namespace, console: Console) -> int:
    from mmke.data.build.pipeline import Context, Step, open_draft, run_step

    has_draft = (args.out / ".build" / "draft.json").is_file()
    ctx = open_draft(args.out) if has_draft else Context(args.out, name=args.out.name)
    ctx.base = Path.cwd()  # settings typed on the command line are relative to here
    args.out.mkdir(parents=True, exist_ok=True)
    run_step(ctx, Step(args.target, _nested(args.settings)))  # an item step saves the draft itself
    console.print(f"{args.target}: {len(ctx.items)} item(s) in {args.out / '.build' / 'draft.json'}")
    _print_build_outputs(console, args.out)
    return 0


def _nested(pairs: Sequence[str]) -> dict:
    """``a.b=1 c=x`` -> ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML)."""
    from mmke.config import parse_value

    out: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise MmkeError(f"setting {pair!r} must look like key=value")
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = parse_value(raw, pair)
    return out


def _print_build_outputs(console: Console, out: Path) -> None:
    failures = out / ".build" / "failures.jsonl"
    if failures.is_file():
        n = sum(1 for _ in failures.open(encoding="utf-8"))
        console.print(f"[yellow]{n} generation failure(s) reported in {failures}[/yellow]")
    for name in ("cases.jsonl", "cases_eval.jsonl"):
        if (out / name).is_file():
            console.print(f"wrote {out / name}: evaluate it with mmke run benchmark=native:{out / name}")


def cmd_review(args: argparse.Namespace, console: Console) -> int:
    from mmke.data.build import review

    if args.static:
        console.print(f"wrote {review.write_static(args.dir)}")
        return 0
    with review.serve(args.dir, port=args.port) as server:
        console.print(f"reviewing {args.dir} at {server.url} (Ctrl-C to stop; decisions save as you go)")
        with contextlib.suppress(KeyboardInterrupt):
            server.wait()
    return 0


def cmd_validate(args: argparse.Namespace, console: Console) -> int:
    """Every bad record of a benchmark file (any format): one ``file:line (case): problem`` each."""
    from mmke.data.benchmark import load_benchmark
    from mmke.errors import BadRecordError

    options = _options(args.options)
    try:
        bench = load_benchmark(f"{args.format}:{args.file}", args.image_root, skip_bad=True, options=options)
    except BadRecordError as e:  # the file itself cannot be read: nothing after the break is known
        console.print(str(e), markup=False, highlight=False, soft_wrap=True)
        return 1
    for p in bench.skipped:
        console.print(str(p), markup=False, highlight=False, soft_wrap=True)
    if bench.skipped:
        console.print(f"{len(bench.skipped)} problem(s) in {args.file}; {len(bench.cases)} good case(s)")
        return 1
    console.print(f"{args.file}: ok ({len(bench.cases)} cases)")
    return 0


def _options(pairs: Sequence[str]) -> dict[str, object]:
    """Reader options given as key=value (values parsed as YAML, like run overrides)."""
    from mmke.config import key_values

    return key_values(pairs, "option", "hop=2")


def cmd_convert(args: argparse.Namespace, console: Console) -> int:
    """Read a foreign benchmark file and write it as native JSONL (same cases, same image root)."""
    import os

    from mmke.data.benchmark import load_benchmark
    from mmke.data.schema import write_cases
    from mmke.errors import ConfigError

    if args.to != "native":
        raise ConfigError(f"convert --to {args.to!r}: only 'native' is written")
    options = _options(args.options)
    bench = load_benchmark(
        f"{args.source}:{args.file}", args.image_root, skip_bad=args.skip_bad, options=options
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    root = bench.image_root
    header = {"benchmark": bench.name, "source": str(args.file), "converted_from": args.source}
    if root is not None:  # relative to the output, so the pair can move together
        header["image_root"] = os.path.relpath(root, args.out.resolve().parent)
    n = write_cases(args.out, bench.cases, header)
    for p in bench.skipped:
        console.print(f"skipped {p}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {n} cases to {args.out}; run them with: mmke run --benchmark native:{args.out}")
    return 0


def cmd_convert_model(args: argparse.Namespace, console: Console) -> int:
    """Convert an original release (MiniGPT-4, LLaVA-Med, HuatuoGPT-Vision) into a transformers folder."""
    from mmke.models.convert import convert_model

    report = convert_model(args.kind, args.src, args.out)
    console.print(report.summary(), markup=False, highlight=False, soft_wrap=True)
    console.print(f"try: mmke run model={args.out} limit=2 methods=[ft_llm]", markup=False, highlight=False)
    return 0


def _bundled_rows() -> list[tuple[str, str, str]]:
    from mmke.bundled import bundled_dir
    from mmke.registry import bundled_models

    rows = []
    for name, source, _ in bundled_models.listing():
        built = (bundled_dir(name) / "config.json").is_file()
        state = "ready" if built else "not built: run `mmke build model`"
        rows.append((name, source, f"bundled model (LLaVA trained on the world, {state})"))
    return rows


#: A listing's column names and its rows.
Listing = tuple[tuple[str, ...], list[tuple[str, ...]]]
#: "from": mmke for a built-in, "DIST VERSION" for a plugin's (``Registry.source``).
NAME_COLUMNS = ("name", "from", "what it is")


def _registered(kind: str) -> Callable[[], Listing]:
    """The listing of one registry of ``mmke.registry`` (by its attribute name)."""

    def rows() -> Listing:
        from mmke import registry

        return NAME_COLUMNS, list(getattr(registry, kind).listing())

    return rows


def _model_listing() -> Listing:
    _, families = _registered("model_families")()
    return NAME_COLUMNS, [(f"family: {n}", src, h) for n, src, h in families] + _bundled_rows()


def _metric_listing() -> Listing:
    from mmke.eval.metrics import metric_specs
    from mmke.registry import metrics

    specs = metric_specs()
    sources = {name: src for name, src, _ in metrics.listing()}
    rows = [(s.key, f"{s.label} ({s.paper})", s.aggregate, s.help, sources[s.key]) for s in specs]
    return ("key", "paper name", "aggregation", "meaning", "from"), rows


def _scorer_listing() -> Listing:
    from mmke.registry import scorers

    helps, rows = dict(scorers.describe()), []
    for name in scorers.declared():
        sc = scorers.get(name)
        emulations = ", ".join(sc.emulations) or "–"
        rows.append((f"{name} (v{sc.version})", sc.follows, emulations, helps[name], scorers.source(name)))
    return ("scoring=", "follows", "emulate=", "what", "from"), rows


def _listings() -> dict[str, Callable[[], Listing]]:
    """What ``mmke list`` can show, in the order it shows everything."""
    return {
        "benchmarks": _registered("benchmarks"),
        "models": _model_listing,
        "methods": _registered("methods"),
        "metrics": _metric_listing,
        "scorers": _scorer_listing,
        "protocols": _registered("protocols"),
        "judges": _registered("judges"),
    }


def cmd_chat(args: argparse.Namespace, console: Console) -> int:
    """``mmke chat``: ask a model (and an edited copy) questions about an image, in the terminal."""
    from mmke.chat import cmd_chat as chat

    return chat(args, console)


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    listings = _listings()
    for kind in [args.what] if args.what else list(listings):
        try:
            columns, rows = listings[kind]()
        except ModuleNotFoundError as e:  # a kind whose package has not been written yet
            log.debug("no %s registered: %s", kind, e)
            columns, rows = NAME_COLUMNS, []
        table = Table(title=kind)
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*(escape(cell) for cell in row))
        console.print(table)
    return 0


def cmd_build_model(args: argparse.Namespace, console: Console) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from mmke.bundled import WorldModelSpec, bundled_dir, keep_freed_memory, train_world_model
    from mmke.data.world import world_dir

    keep_freed_memory()
    spec = WorldModelSpec.smoke() if args.smoke else WorldModelSpec()
    if args.epochs is not None:
        spec = replace(spec, epochs=args.epochs)
    out = args.out or bundled_dir("world")
    world = world_dir(args.world_seed)
    columns = (
        TextColumn("training"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("train", total=None, loss="-")

        def step(done: int, total: int, loss: float) -> None:
            bar.update(task, completed=done, total=total, loss=f"{loss:.3f}")

        report = train_world_model(world, out, spec, step, args.vision_from)
    console.print(
        f"saved the world model to {out} ({report['parameters']:,} parameters, {report['train_seconds']} s)"
    )
    _print_checks(console, report["checks"])
    return 0


def _print_checks(console: Console, checks: dict) -> None:
    table = Table(title="pre-edit accuracy on the world's checks")
    for col in ("check", "items", "exact match %", "token accuracy %"):
        table.add_column(col)
    for name, c in checks.items():
        table.add_row(name, str(c["n"]), f"{100 * c['exact_match']:.1f}", f"{100 * c['token_accuracy']:.1f}")
    console.print(table)


def cmd_eval_base(args: argparse.Namespace, console: Console) -> int:
    from mmke.bundled import evaluate_checks
    from mmke.data.world import world_dir
    from mmke.models import LVLM

    model = LVLM.load(args.model)
    _print_checks(console, evaluate_checks(model, world_dir(args.world_seed)))
    return 0


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    """The main job: edit and evaluate every configured method, record each case, report."""
    from mmke.config import load_config
    from mmke.eval.executors import executor_for
    from mmke.eval.job import preflight
    from mmke.eval.runner import with_hparams
    from mmke.eval.store import RunStore

    executor = executor_for(args.executor, args.workers, args.ray_address)
    given = [*_run_flags(args), *args.overrides]
    with contextlib.ExitStack() as held:
        if args.resume:
            store = RunStore.open(args.resume)
            held.enter_context(store.locked())  # a second writer is told before any reading or loading
            cfg = _resumed_config(store, args.config, given)
            bench = preflight(cfg)
        else:
            cfg = with_hparams(load_config(args.config, given))  # config.yaml keeps what files resolved to
            bench = preflight(cfg)  # nothing is created on disk before this passes
            store = RunStore.create(Path(cfg.out), args.run_id, cfg.to_dict())
            held.enter_context(store.locked(discard_if_empty=True))
        console.print(f"run {store.path}: {', '.join(cfg.methods)} on {cfg.benchmark} with model {cfg.model}")
        summary = _run_with_progress(console, cfg, store, executor, bench)
    _print_summary(console, summary)  # with a line for each reason the run is not complete
    reported = _write_report(console, store.path)
    return 1 if run_failures(summary) or not reported else 0


def _run_with_progress(
    console: Console, cfg: RunConfig, store: RunStore, executor: Executor, bench: Benchmark
) -> RunSummary:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from mmke.eval.job import run

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("scoring the unedited model", total=None)

        def step(done: int, total: int, method: str) -> None:
            bar.update(task, completed=done, total=total, description=f"editing ({method})")

        try:
            return run(cfg, store, step, executor, bench)
        except OSError as e:  # a full disk, a folder gone read-only: what was recorded is kept
            kept = len(store.records())
            raise MmkeError(
                f"{_os_error(e)}; the {kept} case record(s) written so far are kept: "
                f"fix it, then `mmke run --resume {store.path}`"
            ) from None


def _resumed_config(store: RunStore, config: Path | None, given: Sequence[str]) -> RunConfig:
    """The saved run's settings; settings given with ``--resume`` must equal them (else a ConfigError
    naming the keys that differ), since a resumed run finishes its own plan."""
    from mmke.config import load_config
    from mmke.errors import ConfigError

    saved = _as_overrides(store.config)
    cfg = load_config(None, saved)
    if config is None and not given:
        return cfg
    asked = load_config(config, [*saved, *given]).to_dict()
    had = cfg.to_dict()
    differ = [f"{k} (saved {had[k]!r}, given {asked[k]!r})" for k in had if asked[k] != had[k]]
    if differ:
        raise ConfigError(
            f"--resume {store.path}: the run was started with other settings: {'; '.join(differ)}; "
            "resume without them, or start a new run"
        )
    return cfg


def run_failures(summary: RunSummary) -> list[str]:
    """Why a finished run is not complete, one line each: methods not run, cases that failed with an
    error, and method groups whose every edit collapsed (e.g. float16 on CPU). Empty: complete."""
    lines = [f"incomplete: {m} not run ({why})" for m, why in summary.run.not_run.items()]
    for g in summary.groups:
        if g.edit_type != "all" or g.task is not None:
            continue
        name = f"{g.method}" + (f" ({g.protocol})" if g.protocol != "single" else "")
        if g.n_error:
            lines.append(f"incomplete: {name}: {g.n_error} case(s) failed with an error (see cases.jsonl)")
        elif g.n_cases and g.n_collapsed == g.n_cases:
            lines.append(f"failed: {name}: every edit collapsed (non-finite weights or scores)")
    return lines


def _run_flags(args: argparse.Namespace) -> list[str]:
    """``--benchmark`` / ``--image-root`` / ``--model`` / ``--skip-bad`` as overrides (key=value wins)."""
    flags = [f"benchmark={json.dumps(args.benchmark)}"] if args.benchmark else []
    flags += [f"image_root={json.dumps(str(args.image_root))}"] if args.image_root else []
    flags += [f"model={json.dumps(args.model)}"] if args.model else []
    flags += ["skip_bad=true"] if args.skip_bad else []
    return flags


def cmd_train_editor(args: argparse.Namespace, console: Console) -> int:
    """Meta-train a trainable editor for one model on a benchmark's train split (resumable)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from mmke.bundled import bundled_dir
    from mmke.config import load_config
    from mmke.errors import ConfigError
    from mmke.eval.runner import benchmark_images, method_options, open_benchmark
    from mmke.methods.trainable import TrainableEditor
    from mmke.models import LVLM
    from mmke.registry import bundled_models, methods

    flags = [f"model={args.model}"] if args.model else []
    flags += [f"benchmark={args.benchmark}"] if args.benchmark else []
    cfg = load_config(args.config, [*flags, *args.overrides])
    editor_cls = methods.get(args.method)
    if not (isinstance(editor_cls, type) and issubclass(editor_cls, TrainableEditor)):
        raise ConfigError(f"{args.method} has nothing to train (trainable: {', '.join(_trainable())})")
    bench = open_benchmark(cfg)
    if not bench.train_cases:
        raise ConfigError(f"benchmark {cfg.benchmark} has no train split to train {args.method} on")
    model = LVLM.load(cfg.model, dtype=cfg.dtype, device=cfg.device, images=benchmark_images(bench))
    editor = editor_cls(method_options(model.source, cfg, args.method, model.layout))
    default_out = (
        bundled_dir(cfg.model) / "editors" if cfg.model in bundled_models else Path(cfg.out) / "editors"
    )
    out = args.out or default_out / args.method
    console.print(f"training {args.method} for {cfg.model} on {len(bench.train_cases)} train cases -> {out}")
    columns = (
        TextColumn(args.method),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("train", total=None, loss="-")

        def step(done: int, total: int, loss: float, stats: object) -> None:
            bar.update(task, completed=done, total=total, loss=f"{loss:.4f}")

        summary = editor.fit(model, bench.train_cases, out, step)
    final = ", ".join(f"{k} {v:.4g}" for k, v in summary["final"].items())
    console.print(f"saved {out} ({summary['steps']} steps, {summary['seconds']} s; last 10%: {final})")
    return 0


def _trainable() -> list[str]:
    from mmke.methods.trainable import TrainableEditor
    from mmke.registry import methods

    return [
        n for n in methods.names() if isinstance(c := methods.get(n), type) and issubclass(c, TrainableEditor)
    ]


def _as_overrides(config: dict) -> list[str]:
    """A saved config as key=value overrides (JSON values parse as YAML), to rebuild the RunConfig."""
    return [f"{k}={json.dumps(v)}" for k, v in config.items() if k != "method_options"] + [
        f"method_options.{m}.{k}={json.dumps(v)}"
        for m, opts in (config.get("method_options") or {}).items()
        for k, v in opts.items()
    ]


def _print_summary(console: Console, summary: RunSummary) -> None:
    from mmke.report.tables import build_tables, rich_table

    counts: dict[str, int] = {}
    for g in summary.groups:
        if g.edit_type != "all" and g.task is None and g.protocol == "single":
            counts[g.edit_type] = max(counts.get(g.edit_type, 0), g.n_cases)
    if counts:
        console.print("cases per edit type: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    tables = build_tables(summary)
    shown = {"main", "main_exact", "teacher_vs_generated", "generation_measures", "sequential", "lifelong"}
    shown |= {"batch", "comprehendedit", "mmqake", "tasks"}
    if any(t.name == "tasks" for t in tables):  # MultiMedEdit reports efficiency beside its task split
        shown.add("efficiency")
    for table in tables:
        # three columns per metric: on a run with many metrics it would not fit; the report has it
        if table.name == "generation_measures" and len(table.columns) > 11:
            continue
        if table.name in shown:
            console.print(rich_table(table))
    for line in run_failures(summary):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    if summary.run.skipped_records:
        console.print(f"{summary.run.skipped_records} bad benchmark record(s) skipped (see skipped.jsonl)")


def _write_report(console: Console, run_dir: Path, out: Path | None = None) -> bool:
    """Write the run's report; a folder that cannot be written is one line (the results are safe)."""
    from mmke.report import write_report

    try:
        console.print(f"report: {write_report(run_dir, out)}")
    except OSError as e:
        where = e.filename or out or run_dir
        print(
            f"mmke: error: report not written ({e.strerror}: {where}); the results are saved: "
            f"write it elsewhere with `mmke report {run_dir} --out DIR`",
            file=sys.stderr,
        )
        return False
    return True


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    from mmke.eval.store import RunStore

    store = RunStore.open(args.run)
    summary = store.read_summary()
    if summary is None:
        raise MmkeError(f"{args.run}: no summary.json yet (finish it with `mmke run --resume {args.run}`)")
    _print_summary(console, summary)
    if args.table:
        from mmke.report.tables import rich_table, select_table

        console.print(rich_table(select_table(summary, args.table)))
    return 0 if _write_report(console, args.run, args.out) else 1


def cmd_compare(args: argparse.Namespace, console: Console) -> int:
    from mmke.report import compare_runs

    console.print(
        compare_runs(args.a, args.b, mixed=args.mixed), markup=False, highlight=False, soft_wrap=True
    )
    return 0


def _run_help() -> str:
    from mmke.config import describe_fields

    rows = [f"  {n:<15} {t:<22} default {d:<32} {h}" for n, t, d, h in describe_fields()]
    return "settings (key=value overrides or YAML keys):\n" + "\n".join(rows)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mmke", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    base = sub.add_parser("eval-base", help="the unedited model's accuracy on the world's check sets")
    base.add_argument("--model", default="world", help="a model directory or a bundled model name")
    base.add_argument("--world-seed", type=int, default=0)
    base.set_defaults(func=cmd_eval_base)

    run = sub.add_parser(
        "run",
        help="the main job: edit and evaluate (default: the embedded world)",
        epilog=_run_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "overrides", nargs="*", metavar="key=value", help="settings, e.g. limit=50 methods=[ft_llm]"
    )
    run.add_argument("--config", type=Path, default=None, help="a YAML file of settings")
    run.add_argument("--benchmark", default=None, help="e.g. world, vlkeb:eval_multihop.json (`mmke list`)")
    run.add_argument(
        "--image-root", type=Path, default=None, help="folder the benchmark's image paths are in"
    )
    run.add_argument("--model", default=None, help="a model directory or a bundled model name")
    run.add_argument("--skip-bad", action="store_true", help="skip bad records (listed in skipped.jsonl)")
    run.add_argument("--resume", type=Path, default=None, help="continue an interrupted run directory")
    run.add_argument("--run-id", default=None, help="name of the run directory (default: time + hash)")
    run.add_argument(
        "--workers", type=int, default=1, help="shard the cases over N worker processes (one model each)"
    )
    run.add_argument(
        "--executor", default="local", help="local (processes on this machine) or ray (a Ray cluster)"
    )
    run.add_argument("--ray-address", default=None, help="the Ray cluster to join (default: start one)")
    run.set_defaults(func=cmd_run)

    tr = sub.add_parser(
        "train-editor",
        help="meta-train an editor (SERAC, MEND, KE, VisEdit, LiveEdit) on a train split (resumable)",
        description="Re-running with the same --out resumes from its last checkpoint.",
    )
    tr.add_argument("--method", required=True, help="serac, mend, ke, visedit or liveedit")
    tr.add_argument("--model", default=None, help="a model directory or a bundled model (default: world)")
    tr.add_argument("--benchmark", default=None, help="default: world")
    tr.add_argument(
        "--out", type=Path, default=None, help="default: the bundled model's editors/ or <out>/editors/"
    )
    tr.add_argument("--config", type=Path, default=None, help="a YAML file of run settings")
    tr.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. method_options.mend.train_steps=500"
    )
    tr.set_defaults(func=cmd_train_editor)

    rep = sub.add_parser("report", help="tables, plots and one HTML page for a finished run")
    rep.add_argument("run", type=Path)
    rep.add_argument("--table", default=None, help="also print this table, e.g. mmke_bench, edit_types")
    rep.add_argument("--out", type=Path, default=None, help="write the report here (default: the run folder)")
    rep.set_defaults(func=cmd_report)

    cmp = sub.add_parser("compare", help="two runs side by side (markdown)")
    cmp.add_argument("a", type=Path)
    cmp.add_argument("b", type=Path)
    cmp.add_argument(
        "--mixed",
        action="store_true",
        help="show results scored by different definitions (paper protocols) side by side, marked",
    )
    cmp.set_defaults(func=cmd_compare)

    chat = sub.add_parser("chat", help="ask a model, and an edited copy of it, questions about an image")
    chat.add_argument("model", help="a model directory or a bundled model name (world)")
    chat.add_argument(
        "--edited",
        type=Path,
        default=None,
        metavar="DIR",
        help="what `mmke edit` saved (or any model folder): both answer, side by side",
    )
    chat.add_argument(
        "--image",
        type=Path,
        default=None,
        metavar="PATH",
        help="the image asked about (:image PATH switches)",
    )
    chat.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="longest answer, in tokens")
    chat.add_argument(
        "--dtype",
        default=None,
        metavar="D",
        help="float32, bfloat16 or float16 (default: float32, or the edited model's)",
    )
    chat.add_argument("--device", default="cpu", metavar="D", help="torch device: cpu, cuda, cuda:1 …")
    chat.set_defaults(func=cmd_chat)

    lst = sub.add_parser(
        "list", help="registered benchmarks, model families, methods, metrics, scorers, protocols, judges"
    )
    lst.add_argument("what", nargs="?", choices=list(_listings()))
    lst.set_defaults(func=cmd_list)

    build = sub.add_parser("build", help="build benchmarks and artefacts")
    bsub = build.add_subparsers(dest="target", required=True)
    world = bsub.add_parser("world", help="generate the world benchmark (deterministic from --seed)")
    world.add_argument("--out", type=Path, default=Path("out/world"))
    world.add_argument("--seed", type=int, default=0)
    world.add_argument("--stats", action="store_true", help="print counts per type, edit type, kind, hop")
    world.add_argument("--force", action="store_true", help="rebuild even if --out holds a world")
    world.set_defaults(func=cmd_build_world)

    model = bsub.add_parser("model", help="train the bundled world model from scratch (CPU, minutes)")
    model.add_argument("--out", type=Path, default=None, help="default: the package's bundled model folder")
    model.add_argument("--world-seed", type=int, default=0)
    model.add_argument("--epochs", type=int, default=None)
    model.add_argument("--smoke", action="store_true", help="a seconds-long tiny version (for tests)")
    model.add_argument(
        "--vision-from",
        type=Path,
        default=None,
        help="reuse the vision tower of a model built with the same stage-1 recipe (skips stage 1)",
    )
    model.set_defaults(func=cmd_build_model)

    tiny = bsub.add_parser(
        "tiny-model",
        help="a tiny random model of a family, saved offline (check a set-up before downloading)",
    )
    tiny.add_argument("family", choices=_tiny_kinds())
    tiny.add_argument("--out", type=Path, required=True)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_build_tiny_model)

    pipe = bsub.add_parser("pipeline", help="run a build pipeline file (examples/pipelines/*.yaml)")
    pipe.add_argument("file", type=Path)
    pipe.add_argument("--out", type=Path, required=True)
    pipe.add_argument("--seed", type=int, default=None, help="default: the file's seed")
    pipe.set_defaults(func=cmd_build_pipeline)
    _add_step_parsers(bsub)

    rev = sub.add_parser("review", help="review generated items in a browser (127.0.0.1) or a static page")
    rev.add_argument("dir", type=Path, help="a folder with review_items.jsonl (a build's review step)")
    rev.add_argument("--static", action="store_true", help="write DIR/review.html instead of serving")
    rev.add_argument("--port", type=int, default=8765)
    rev.set_defaults(func=cmd_review)

    val = sub.add_parser("validate", help="check a benchmark file; print file:line (case): problem")
    val.add_argument("file", type=Path)
    val.add_argument(
        "--format",
        default="native",
        help="native or a reader of `mmke list benchmarks` (mmedit, vlkeb, cckeb …)",
    )
    val.add_argument("--image-root", type=Path, default=None)
    val.add_argument("options", nargs="*", metavar="key=value", help="the reader's options, e.g. hop=2")
    val.set_defaults(func=cmd_validate)

    conv = sub.add_parser("convert", help="write a foreign benchmark file as native JSONL")
    conv.add_argument("file", type=Path)
    conv.add_argument(
        "--from",
        dest="source",
        required=True,
        help="a reader of `mmke list benchmarks` (mmedit, vlkeb, cckeb …)",
    )
    conv.add_argument("--to", default="native", help="native (the only writer)")
    conv.add_argument("--out", type=Path, required=True, help="the .jsonl file to write")
    conv.add_argument("--image-root", type=Path, default=None)
    conv.add_argument("--skip-bad", action="store_true", help="leave bad records out instead of stopping")
    conv.add_argument("options", nargs="*", metavar="key=value", help="the reader's options, e.g. hop=2")
    conv.set_defaults(func=cmd_convert)

    cm = sub.add_parser(
        "convert-model",
        help="convert an original MiniGPT-4 / LLaVA-Med / HuatuoGPT-Vision release to a transformers folder",
    )
    cm.add_argument("kind", help="minigpt4, llava_med or huatuogpt_vision")
    cm.add_argument("src", type=Path, help="the folder of the original files (README: Original checkpoints)")
    cm.add_argument("--out", type=Path, required=True, help="a new folder for the converted model")
    cm.set_defaults(func=cmd_convert_model)

    from mmke.saving import add_edit_parser

    add_edit_parser(sub)  # mmke edit MODEL --method M (--edits F | --prompt P --target T …) --out DIR
    return p


def _add_step_parsers(bsub: argparse._SubParsersAction) -> None:
    """``mmke build STEP OUT key=value``: one item step on a build folder's saved draft."""
    from mmke.data.build.pipeline import is_item_step
    from mmke.registry import build_steps

    for name, help_ in build_steps.describe():
        if not is_item_step(name):
            continue
        step = bsub.add_parser(name, help=f"pipeline step: {help_}")
        step.add_argument(
            "out", type=Path, help="the build folder (its .build/draft.json is read and updated)"
        )
        step.add_argument("settings", nargs="*", metavar="key=value", help="the step's settings")
        step.set_defaults(func=cmd_build_step)


class _Parser(argparse.ArgumentParser):
    """Options and positionals (``key=value`` settings) in any order, on every subcommand.

    Plain argparse stops filling ``nargs="*"`` positionals at the first option, so
    ``mmke run limit=2 --model world methods=[ft_llm]`` was refused; intermixed parsing is not.
    A parser with subcommands parses as usual and hands the rest to the chosen subcommand.
    """

    _intermixing = False

    def error(self, message: str) -> NoReturn:
        """A usage error as the one line every mmke error is (argparse prints the usage first)."""
        self.exit(2, f"mmke: error: {self.prog}: {message} (see `{self.prog} --help`)\n")

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        has_sub = any(a.nargs in (argparse.PARSER, argparse.REMAINDER) for a in self._actions)
        if has_sub or self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def _os_error(e: OSError) -> str:
    """An OS error as ``what: which file`` (a full disk says how to fix it)."""
    what = e.strerror or type(e).__name__
    where = f": {e.filename}" if e.filename else ""
    return f"{what}{where}"


def _quiet_offline_hub() -> None:
    """Nothing may download at run time, and library progress bars would break the one-line errors."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(var, "1")
    if "transformers" in sys.modules:  # imported before us (tests, notebooks): the env var came too late
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_offline_hub()
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    # off a terminal rich assumes 80 columns, which squeezes the paper-wide tables
    console = Console(width=shutil.get_terminal_size((160, 40)).columns)
    func: Callable[[argparse.Namespace, Console], int] = args.func
    try:
        return func(args, console)
    except MmkeError as e:
        _fail(args, f"mmke: error: {e}")
        return 2
    except OSError as e:  # a missing or unwritable file, a full disk: the message names the file
        _fail(args, f"mmke: error: {_os_error(e)}")
        return 2
    except KeyboardInterrupt:
        print("mmke: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: still one line; -v shows where
        _fail(args, f"mmke: internal error: {type(e).__name__}: {e} (run with -v for the traceback)")
        return 70


def _fail(args: argparse.Namespace, line: str) -> None:
    """One line on stderr; with ``-v`` the traceback first."""
    if args.verbose:
        import traceback

        traceback.print_exc()
    print(line.splitlines()[0] if line.strip() else line, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
