"""mmke's runner against the anchors' evaluation loop, side by side in one process, same cases and seed.

Run: ``.venv/bin/python bench/run.py`` (about 5 minutes on 2 CPU cores; ``--help`` for options).

For each (model, method) it runs
  (a) the reference loop, written the way the anchor repositories evaluate: every probe in its own
      forward pass at batch size 1, the pre-edit scores recomputed for every case, and the model
      restored from a deep copy taken before each edit; and
  (b) mmke's runner: one batched pre-edit pass over all cases, each case's probes batched, exact
      restore from the edited parameters' snapshot, every record appended to a run store;
checks both give the same metric values, and prints cases/s of each and their ratio, mmke's time
over the floor (each edit's own compute + one batched forward of its case's probes as asked, a
context they all share run once per image; see ``floor_seconds``), and peak
memory: the process's peak RSS above its resting RSS with the model loaded, against the snapshot
of the edited parameters. ``--workers`` adds 1 vs 2 local worker processes on a world run;
``--generation`` times the main job's methods with ``evaluation=[teacher_forced,generation]``
against teacher forcing alone (goal: at most 1.5x). Every other timing here is teacher-forced.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import torch

from mmke.config import RunConfig
from mmke.data.benchmark import load_benchmark
from mmke.eval._efficiency import measure
from mmke.eval.executors import InProcess, LocalWorkers
from mmke.eval.job import run
from mmke.eval.metrics import score_case
from mmke.eval.records import CaseRecord
from mmke.eval.runner import Session, benchmark_images, editor_for, run_method, select_cases
from mmke.eval.store import RunStore
from mmke.models import LVLM
from mmke.models.gguf import smollm2_dir
from mmke.types import EditCase, Sample

GOALS = {"speedup": 5.0, "floor": 1.25, "memory": 1.2, "workers": 1.7, "generation": 1.5}
TEACHER_FORCED = ("teacher_forced",)
#: A run scores the unedited model once and every method reuses it; the main job runs this many.
MAIN_JOB_METHODS = len(RunConfig().methods)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reference_loop(model: LVLM, editor: Any, cases: tuple[EditCase, ...], seed: int) -> list[dict]:
    """The anchors' way: per-probe forwards at batch 1, pre recomputed per case, deep-copy restore."""
    metrics = []
    for index, case in enumerate(cases):
        pre = [model.score([p], batch_size=1)[0] for p in case.probes]
        backup = copy.deepcopy(model.model.state_dict())
        torch.manual_seed(seed * 1_000_003 + index)  # the runner's per-position edit seed
        edited = editor.apply(model, case)
        post = [edited.score([p], batch_size=1)[0] for p in case.probes]
        model.model.load_state_dict(backup)
        edited.restore()  # the method's own bookkeeping (its weights are already back)
        metrics.append(score_case(case.probes, post, pre).metrics)
    return metrics


class _Records(list):
    """A sink for the runner that keeps records in memory (the bench times a real store as well)."""

    def __init__(self, store: RunStore) -> None:
        super().__init__()
        self.store = store
        self.config_hash = store.config_hash

    def append(self, record: Any) -> None:
        self.store.append(record)
        super().append(record)

    def done_keys(self) -> set:
        return set()


def session_for(model: LVLM, method: str, cfg: RunConfig, bench: Any, cases: tuple, out: Path) -> Session:
    """A runner session on these cases, recording into a fresh run store, with its editor built.

    The model is bound to a fresh image store, as ``open_session`` binds one.
    """
    model.bind_images(benchmark_images(bench))
    sink = _Records(RunStore.create(out, None, cfg.to_dict()))
    s = Session(cfg, model, cfg.model, bench, cases, sink, {})
    editor_for(s, method)  # built (trained editors loaded) before any timing, and shared
    return s


def mmke_loop(s: Session, method: str) -> tuple[list[CaseRecord], float, float]:
    """mmke's runner on the session's cases: its records, its wall time (pre pass included) and
    the pre pass's share of it."""
    start = time.perf_counter()
    s.ensure_pre(range(len(s.cases)))
    pre = time.perf_counter() - start
    run_method(s, method)
    return list(cast(_Records, s.store)), time.perf_counter() - start, pre


def floor_seconds(model: LVLM, editor: Any, cases: tuple[EditCase, ...], bench: Any) -> float:
    """The floor's scoring part: per case, what any implementation of the method must compute after
    its edit, each thing once. That is the method's own work on the probes before a forward
    (SERAC's scope routing, in ``view``), one batched forward of the probes as the edited model
    is asked them, less the context they all share (IKE's demonstrations), and one batched
    forward of that shared context alone per distinct image (it follows the image, so each image
    needs its own; written in the family's prompt format around a one-token answer, a few tokens
    more than the shared part itself). Its edit part is each edit's own compute, as the runner
    timed it. For a method that leaves prompts alone this is one batched forward of each case's
    probes on the edited model.

    The forwards read the images through a fresh store, as mmke's run does: both decode each
    image once (a store warmed by the loops before would hand the floor its pictures for free).
    """
    model.bind_images(benchmark_images(bench))
    total = 0.0
    for case in cases:
        edited = editor.apply(model, case)
        try:
            start = time.perf_counter()
            asked = list(edited.view(case.probes))
            shared = shared_start([a.prompt for a in asked]) if len(asked) > 1 else 0
            shared = shared if shared >= SHARED_CONTEXT else 0
            own = [Sample(a.prompt[shared:], a.target, a.image) for a in asked]
            edited.model.score(own, batch_size=len(own))
            if shared:
                context = {a.image: Sample(asked[0].prompt[:shared], "x", a.image) for a in asked}
                with torch.inference_mode():
                    edited.model.logits(edited.model.encode(list(context.values())))
            total += time.perf_counter() - start
        finally:
            edited.restore()
    return total


#: A text all a case's asked prompts start with is a context the method added (IKE's
#: demonstrations) from this many characters; shorter, it is the prompts' own words.
SHARED_CONTEXT = 64


def shared_start(texts: list[str]) -> int:
    """How many leading characters all ``texts`` share (those of the first and last in sort order)."""
    first, last = min(texts), max(texts)
    pairs = zip(first, last, strict=False)  # the shorter one ends it
    return next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(first), len(last)))


def warm_up(model: LVLM, cases: tuple[EditCase, ...], batch_size: int) -> None:
    """Untimed: every batch shape the loops will meet (the pre-edit pass's, a case's, a probe's alone)
    runs once, so neither loop pays the first-call costs of the kernels for a new shape (in a run
    they are paid once, by the pre-edit pass, not by every method)."""
    probes = [p for c in cases for p in c.probes]
    model.score(probes, batch_size=batch_size)
    for case in cases:
        model.score(case.probes, batch_size=len(case.probes))
    model.score(probes, batch_size=1)


def compare(
    label: str, model: LVLM, method: str, cfg: RunConfig, bench: Any, cases: tuple, out: Path
) -> dict[str, Any]:
    model_mb = sum(p.numel() * p.element_size() for p in model.model.parameters()) / 2**20
    session = session_for(model, method, cfg, bench, cases, out)
    session_images = model.images  # each loop keeps reading its own store, warmed as it goes

    def fresh() -> Any:
        """An editor built as the session's (trained weights loaded): each timed loop gets its own,
        so none finds the caches another filled (SERAC's routing embeddings of these probes)."""
        return session_for(model, method, cfg, bench, cases, out).editors[method]

    editor, warming = fresh(), fresh()
    reference_images = benchmark_images(bench)
    model.bind_images(reference_images)
    warm_up(model, cases, cfg.batch_size)
    reference_loop(model, warming, cases[:1], cfg.seed)
    mmke_loop(session_for(model, method, cfg, bench, cases[:2], out), method)
    model.bind_images(session_images)
    rest = _rss_mb()
    with measure(model.device) as m_mmke:
        records, mmke_s, pre_s = mmke_loop(session, method)
    mmke_peak = m_mmke.peak_mb - rest
    model.bind_images(reference_images)
    rest = _rss_mb()
    with measure(model.device) as m_ref:
        start = time.perf_counter()
        ref = reference_loop(model, editor, cases, cfg.seed)
        ref_s = time.perf_counter() - start
    ref_peak = m_ref.peak_mb - rest
    edit_s = sum(r.efficiency["edit_seconds"] for r in records)
    forward_s = floor_seconds(model, fresh(), cases, bench)
    ours = [r.metrics for r in sorted(records, key=lambda r: r.index)]
    diffs = [abs(a[k] - b[k]) for a, b in zip(ours, ref, strict=True) for k in a]
    snapshot = max(r.efficiency["edited_params"] for r in records) * 4 / 2**20
    return {
        "model": label,
        "method": method,
        "cases": len(cases),
        "ref_cps": len(cases) / ref_s,
        "mmke_cps": len(cases) / mmke_s,
        "speedup": ref_s / mmke_s,
        "floor": mmke_s / (edit_s + forward_s),
        # where mmke's time goes, against the floor's edit + forward
        "mmke_s": mmke_s,
        "pre_s": pre_s,
        "edit_s": edit_s,
        "post_s": sum(r.efficiency["score_seconds"] for r in records),
        "forward_s": forward_s,
        "identical": max(diffs, default=0.0) == 0.0,
        "max_diff": max(diffs, default=0.0),
        "model_mb": model_mb,
        "snapshot_mb": snapshot,
        "ref_extra_mb": ref_peak,
        "mmke_extra_mb": mmke_peak,
    }


def text_only(case: EditCase) -> EditCase:
    """The case with every image dropped: its text probes for a text-only model."""
    return replace(
        case, edit=replace(case.edit, image=None), probes=tuple(replace(p, image=None) for p in case.probes)
    )


def print_table(rows: list[dict]) -> None:
    head = (
        "| model | method | cases | reference cases/s | mmke cases/s | speed-up | mmke / floor "
        "| same metrics | model MB | snapshot MB | reference peak +MB | mmke peak +MB |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        same = "yes" if r["identical"] else f"no (max diff {r['max_diff']:.3g})"
        print(
            f"| {r['model']} | {r['method']} | {r['cases']} | {r['ref_cps']:.2f} | {r['mmke_cps']:.2f} "
            f"| {r['speedup']:.1f}x | {r['floor']:.2f} | {same} | {r['model_mb']:.1f} "
            f"| {r['snapshot_mb']:.2f} | {r['ref_extra_mb']:.0f} | {r['mmke_extra_mb']:.0f} |"
        )


def workers_ratio(limit: int, out: Path) -> dict[str, float]:
    """The main job (every default method) on ``limit`` world cases, in 1 process and in 2 local
    worker processes, both from a cold start (model and benchmark loading included)."""
    cfg = RunConfig(limit=limit)
    times = {}
    for name, executor in (("1 process", InProcess()), ("2 workers", LocalWorkers(2))):
        store = RunStore.create(out, None, cfg.to_dict())
        start = time.perf_counter()
        run(cfg, store, executor=executor)
        times[name] = time.perf_counter() - start
    return times


def generation_ratio(limit: int, out: Path) -> dict[str, float]:
    """The main job (every default method) on ``limit`` world cases, teacher-forced only and with
    free generation beside it, both in one process from a cold start."""
    times = {}
    for name, evaluation in (
        ("teacher_forced", TEACHER_FORCED),
        ("+generation", ("teacher_forced", "generation")),
    ):
        cfg = RunConfig(limit=limit, evaluation=evaluation)
        store = RunStore.create(out, None, cfg.to_dict())
        start = time.perf_counter()
        run(cfg, store)
        times[name] = time.perf_counter() - start
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=24, help="world cases per method")
    p.add_argument("--methods", default="ft_llm,ike,mend,serac", help="methods on the world model")
    p.add_argument("--smollm-cases", type=int, default=8, help="text cases for FT-LLM on SmolLM2 (0: skip)")
    p.add_argument("--workers", action="store_true", help="also time 1 process vs 2 worker processes")
    p.add_argument("--only-workers", action="store_true", help="only the workers timing")
    p.add_argument("--workers-limit", type=int, default=60, help="world cases for the workers timing")
    p.add_argument("--generation", action="store_true", help="also time the main job with free generation")
    p.add_argument("--only-generation", action="store_true", help="only the generation timing")
    p.add_argument("--generation-limit", type=int, default=24, help="world cases for the generation timing")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("MMKE_BENCH_THREADS", torch.get_num_threads())))
    out = Path(tempfile.mkdtemp(prefix="mmke-bench-"))
    if args.only_workers:
        args.workers, args.methods, args.smollm_cases = True, "", 0
    if args.only_generation:
        args.generation, args.methods, args.smollm_cases = True, "", 0
    bench = load_benchmark("world")
    rows = []
    cfg = RunConfig(limit=args.cases, evaluation=TEACHER_FORCED)  # the anchors' loop only teacher-forces
    cases = select_cases(bench.cases, args.cases, None)
    world = LVLM.load("world") if args.methods else None
    # the model's own method presets apply, as in `mmke run`
    for method in filter(None, args.methods.split(",")):
        rows.append(compare("world", world, method, replace(cfg, methods=(method,)), bench, cases, out))
        print_table(rows[-1:])
    if args.smollm_cases:
        smol = LVLM.load(smollm2_dir())
        text_cases = tuple(text_only(c) for c in cases[: args.smollm_cases])
        cfg_s = replace(cfg, model=str(smollm2_dir()), methods=("ft_llm",))
        rows.append(compare("SmolLM2-135M", smol, "ft_llm", cfg_s, bench, text_cases, out))
    print()
    print_table(rows)
    met = [r for r in rows if r["speedup"] >= GOALS["speedup"]]
    print(f"\nspeed-up >= {GOALS['speedup']}x: {len(met)}/{len(rows)} rows")
    for r in rows:
        budget = GOALS["memory"] * r["snapshot_mb"]
        other = r["mmke_s"] - r["pre_s"] - r["edit_s"] - r["post_s"]
        shared = (r["mmke_s"] - r["pre_s"] * (1 - 1 / MAIN_JOB_METHODS)) / (r["edit_s"] + r["forward_s"])
        print(
            f"{r['model']}/{r['method']}: mmke / floor {r['floor']:.2f} "
            f"(goal <= {GOALS['floor']} for ft_llm, ike, serac); mmke peak +{r['mmke_extra_mb']:.0f} MB "
            f"over the resting model vs 1.2 x snapshot = {budget:.1f} MB\n"
            f"    mmke {r['mmke_s']:.2f} s = pre-edit pass {r['pre_s']:.2f} + edits {r['edit_s']:.2f} "
            f"+ post-edit scoring {r['post_s']:.2f} + the rest {other:.2f}; "
            f"floor {r['edit_s'] + r['forward_s']:.2f} s = edits + forwards {r['forward_s']:.2f}\n"
            f"    with the pre-edit pass shared as in the main job's {MAIN_JOB_METHODS} methods: "
            f"mmke / floor {shared:.2f}"
        )
    if args.workers:
        times = workers_ratio(args.workers_limit, out)
        ratio = times["1 process"] / times["2 workers"]
        print(
            f"\nmain job on {args.workers_limit} world cases, every default method: "
            f"1 process {times['1 process']:.1f} s, 2 workers {times['2 workers']:.1f} s: "
            f"{ratio:.2f}x (goal >= {GOALS['workers']}x)"
        )
    if args.generation:
        times = generation_ratio(args.generation_limit, out)
        ratio = times["+generation"] / times["teacher_forced"]
        print(
            f"\nmain job on {args.generation_limit} world cases, every default method: teacher-forced "
            f"{times['teacher_forced']:.1f} s, with free generation {times['+generation']:.1f} s: "
            f"{ratio:.2f}x (goal <= {GOALS['generation']}x)"
        )
    if rows:
        median = statistics.median(r["speedup"] for r in rows)
        print(f"\n(median over methods of the speed-up: {median:.1f}x)")


if __name__ == "__main__":
    main()
