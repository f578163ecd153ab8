"""A whole run: check everything first, run every method through an executor, write the summary."""

from __future__ import annotations

import logging
from pathlib import Path

from mmke.config import RunConfig
from mmke.data.benchmark import Benchmark
from mmke.errors import ConfigError
from mmke.eval.executors import Executor, InProcess
from mmke.eval.metrics import summarize
from mmke.eval.records import RunInfo, RunSummary
from mmke.eval.runner import Progress, judge_for, method_hparams, method_options, model_dir, open_cases
from mmke.eval.store import RunStore
from mmke.models._loading import bundled_or_path

log = logging.getLogger(__name__)


def preflight(cfg: RunConfig) -> Benchmark:
    """Check everything a run can check without loading its model, before anything is created,
    loaded or edited: component names, every method's options, the device, the model folder's
    config and the benchmark's records. Returns the benchmark, read once for the run."""
    from mmke.methods.base import make_config
    from mmke.models._loading import check_device, read_config
    from mmke.registry import benchmarks, methods

    benchmarks.get(cfg.benchmark.partition(":")[0])
    source = model_dir(cfg.model)
    # options of methods not run are checked too: method_options.ft_lm.steps=5 is a typo, not a no-op
    for method in dict.fromkeys([*cfg.methods, *cfg.method_options]):
        editor = methods.get(method)
        make_config(editor.defaults, method_options(source, cfg, method), method)
        if (hparams := method_hparams(cfg, method)) is not None:
            log.info("hparams %s", hparams.describe())
    _check_batching(cfg)
    judge_for(cfg)  # its settings, and for an endpoint that the key's variable is set
    path = bundled_or_path(cfg.model)
    check_device(cfg.device, path)
    read_config(path, cfg.trust_remote_code)
    if cfg.image_root is not None and not Path(cfg.image_root).is_dir():
        raise ConfigError(f"image_root={cfg.image_root!r} is not a directory")
    return open_cases(cfg)[0]


def _check_batching(cfg: RunConfig) -> None:
    """protocol=batch: refuse, in one line, the methods that cannot write several edits in one update."""
    from mmke.registry import methods

    if cfg.protocol != "batch" or cfg.batch_edits == 1:
        return
    refused = {m: c.batch_refusal for m in cfg.methods if not (c := methods.get(m)).batches}
    if refused:
        why = "; ".join(f"{m}: {reason}" for m, reason in refused.items())
        can = ", ".join(n for n in methods.names() if methods.get(n).batches)
        raise ConfigError(
            f"protocol=batch batch_edits={cfg.batch_edits}: {', '.join(refused)} cannot write several "
            f"edits in one update ({why}); methods that can: {can}"
        )


def run(
    cfg: RunConfig,
    store: RunStore,
    progress: Progress | None = None,
    executor: Executor | None = None,
    bench: Benchmark | None = None,
) -> RunSummary:
    """Run every configured method on the configured protocol; returns (and stores) the summary.

    ``executor`` says where the work happens (default: in this process; see ``mmke.eval.executors``);
    ``bench`` is ``preflight``'s benchmark (checked and read here when not given).
    """
    bench = preflight(cfg) if bench is None else bench
    bench, not_run = (executor or InProcess()).run(cfg, store, progress, bench)
    info = RunInfo(
        config=cfg.to_dict(),
        config_hash=store.config_hash,
        method_options={m: method_options(model_dir(cfg.model), cfg, m) for m in cfg.methods},
        hparams={m: h.record() for m in cfg.methods if (h := method_hparams(cfg, m)) is not None},
        not_run=not_run,
        skipped_records=len(bench.skipped),
    )
    summary = summarize(store.records(), info)
    store.write_summary(summary)
    return summary
