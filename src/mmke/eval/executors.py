"""Where a run's work happens: in this process, in N local worker processes, or on Ray actors.

The work is cut into units that depend only on the unedited model: a chunk of one method's cases
under single editing (or edit-one-hop), or one method's whole stream under sequential or lifelong
editing, whose edits build on each other. Each worker loads the model and the benchmark once,
scores the unedited model only on the cases it meets, keeps the editors it has built, and sends
every finished record back; the driver alone writes them to the run's store. So the store, resume
and the summary are the same whichever executor ran the cases (the summary does not depend on the
order records arrive in), and a killed run resumes from the records that reached the store.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from mmke.config import RunConfig
from mmke.data.benchmark import Benchmark
from mmke.errors import ConfigError, MmkeError
from mmke.eval.protocols import Unit, protocol_named
from mmke.eval.records import CaseRecord, ResumeKey
from mmke.eval.runner import (
    Progress,
    Session,
    note_skipped,
    open_cases,
    open_session,
    run_in_session,
    run_method,
)
from mmke.eval.store import RunStore
from mmke.methods.base import EditorNotReadyError

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")


class Executor(Protocol):
    def run(
        self, cfg: RunConfig, store: RunStore, progress: Progress | None, bench: Benchmark | None = None
    ) -> tuple[Benchmark, dict[str, str]]:
        """Run every configured method; returns the benchmark and the methods that could not run.

        ``bench``: the run's benchmark when the driver has read it already (``preflight``)."""
        ...


# --- one worker ---------------------------------------------------------------------------


class _Forward:
    """A worker's sink: records go to ``emit`` (back to the driver); the driver's resume keys."""

    def __init__(self, config_hash: str, done: set[ResumeKey], emit: Callable[[CaseRecord], None]) -> None:
        self.config_hash = config_hash
        self.done = done
        self.emit = emit

    def append(self, record: CaseRecord) -> None:
        self.emit(record)

    def done_keys(self) -> set[ResumeKey]:
        return self.done


class Worker:
    """One model and benchmark for a worker's whole life; runs units and hands back their records.

    Records go to ``emit`` as each case finishes (a local worker's queue); without one they are
    kept and returned by ``run`` (a Ray actor's reply).
    """

    def __init__(
        self,
        cfg: RunConfig,
        config_hash: str,
        done: set[ResumeKey],
        threads: int | None,
        emit: Callable[[CaseRecord], None] | None = None,
    ) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.out: list[CaseRecord] = []
        sink = _Forward(config_hash, done, emit or self.out.append)
        self.session: Session = open_session(cfg, sink, score_all=False)

    def run(self, unit: Unit) -> tuple[list[CaseRecord], str | None]:
        """Run one unit; returns its records and, if the method cannot run here, why."""
        s = self.session
        episodes = s.protocol.episodes(s.cfg, len(s.cases))
        chosen = range(len(episodes)) if unit.episodes is None else unit.episodes
        s.ensure_pre(sorted({c for e in chosen for c in episodes[e].cases}))
        self.out.clear()
        try:
            run_method(s, unit.method, unit.episodes)
        except EditorNotReadyError as e:
            return list(self.out), str(e)
        return list(self.out), None


def _threads(workers: int) -> int:
    """Torch threads per worker: the machine's cores shared out, at least one."""
    return max(1, (os.cpu_count() or 1) // workers)


# --- executors ----------------------------------------------------------------------------


class _Driver:
    """The driver's side of a parallel run: appends records, counts progress, collects not-run."""

    def __init__(self, cfg: RunConfig, store: RunStore, progress: Progress | None, n_cases: int) -> None:
        self.store = store
        self.progress = progress
        self.planned = protocol_named(cfg.protocol).planned(cfg, n_cases)
        self.recorded = len(store.records())
        self.not_run: dict[str, str] = {}

    def record(self, record: CaseRecord) -> None:
        self.store.append(record)
        self.recorded += 1
        if self.progress is not None:
            self.progress(self.recorded, self.planned, record.run.method or "")

    def unit_done(self, unit: Unit, not_run: str | None) -> None:
        if not_run is not None and unit.method not in self.not_run:
            log.warning("%s not run: %s", unit.method, not_run)
            self.not_run[unit.method] = not_run


@dataclass
class InProcess:
    """Everything in this process, on one model (the default)."""

    def run(
        self, cfg: RunConfig, store: RunStore, progress: Progress | None, bench: Benchmark | None = None
    ) -> tuple[Benchmark, dict[str, str]]:
        s = open_session(cfg, store, progress, bench=bench)
        note_skipped(store, s.bench)
        s.recorded = len(store.records())
        return s.bench, run_in_session(s)


def _local_worker(
    cfg: RunConfig,
    config_hash: str,
    done: set[ResumeKey],
    threads: int,
    tasks: Any,
    results: Any,
) -> None:
    """A local worker process: units from ``tasks`` until None; records and events to ``results``."""
    try:
        worker = Worker(cfg, config_hash, done, threads, lambda r: results.put(("record", r)))
        while (unit := tasks.get()) is not None:
            _, not_run = worker.run(unit)
            results.put(("unit", (unit, not_run)))
    except MmkeError as e:
        results.put(("error", str(e)))
    except Exception as e:  # reported to the driver in one line; the driver stops the run
        results.put(("error", f"{type(e).__name__}: {e}"))


@dataclass
class LocalWorkers:
    """``workers`` processes on this machine, one model each (``mmke run --workers N``)."""

    workers: int = 2

    def run(
        self, cfg: RunConfig, store: RunStore, progress: Progress | None, bench: Benchmark | None = None
    ) -> tuple[Benchmark, dict[str, str]]:
        ctx = mp.get_context("spawn")  # fork would copy torch's thread pools and any CUDA state
        tasks, results = ctx.Queue(), ctx.Queue()
        args = (cfg, store.config_hash, store.done_keys(), _threads(self.workers), tasks, results)
        procs = [ctx.Process(target=_local_worker, args=args, daemon=True) for _ in range(self.workers)]
        for p in procs:  # first: their imports and model loading overlap the driver's benchmark read
            p.start()
        try:
            bench, cases = open_cases(cfg, bench)
            note_skipped(store, bench)
            driver = _Driver(cfg, store, progress, len(cases))
            units = protocol_named(cfg.protocol).units(cfg, len(cases), self.workers)
            for unit in [*units, *[None] * self.workers]:
                tasks.put(unit)
            left = len(units)
            while left:
                try:
                    kind, payload = results.get(timeout=1.0)
                except queue.Empty:
                    dead = [p for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        raise MmkeError(f"a worker process died (exit code {dead[0].exitcode})") from None
                    continue
                if kind == "record":
                    driver.record(payload)
                elif kind == "unit":
                    driver.unit_done(*payload)
                    left -= 1
                else:
                    raise MmkeError(f"worker failed: {payload}")
            for p in procs:
                p.join()
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
        return bench, driver.not_run


@dataclass
class RayWorkers:
    """``workers`` Ray actors, one model each, on the cluster at ``address`` (``None``: a local one
    with ``workers`` CPUs). Every node must see the model and benchmark at the same paths."""

    workers: int = 2
    address: str | None = None

    def run(
        self, cfg: RunConfig, store: RunStore, progress: Progress | None, bench: Benchmark | None = None
    ) -> tuple[Benchmark, dict[str, str]]:
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'mmke[ray]'") from None
        bench, cases = open_cases(cfg, bench)
        note_skipped(store, bench)
        driver = _Driver(cfg, store, progress, len(cases))
        units = protocol_named(cfg.protocol).units(cfg, len(cases), self.workers)
        started = not ray.is_initialized()
        if started:
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:
                ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False)
        try:
            gpus = 1 if cfg.device.startswith("cuda") else 0
            actor = ray.remote(num_cpus=1, num_gpus=gpus)(Worker)
            done = store.done_keys()
            threads = 1 if self.address is None else None
            free = [actor.remote(cfg, store.config_hash, done, threads) for _ in range(self.workers)]
            todo, pending = list(units), {}
            while todo or pending:  # keep every actor busy; take results as they finish
                while free and todo:
                    a, unit = free.pop(), todo.pop(0)
                    pending[a.run.remote(unit)] = (unit, a)
                [ref], _ = ray.wait(list(pending), num_returns=1)
                unit, a = pending.pop(ref)
                records, not_run = ray.get(ref)
                free.append(a)
                for r in records:
                    driver.record(r)
                driver.unit_done(unit, not_run)
        except ray.exceptions.RayError as e:
            raise MmkeError(f"ray worker failed: {_last_line(e)}") from None
        finally:
            if started:
                ray.shutdown()
        return bench, driver.not_run


def _last_line(e: Exception) -> str:
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    return lines[-1] if lines else type(e).__name__


def executor_for(kind: str, workers: int, address: str | None = None) -> Executor:
    """The executor ``mmke run --workers N --executor KIND [--ray-address A]`` asks for."""
    if kind not in EXECUTORS:
        raise ConfigError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if kind == "ray":
        return RayWorkers(workers, address)
    return InProcess() if workers == 1 else LocalWorkers(workers)
