"""mmke from Python: the model, benchmark and method objects the CLI runs, loaded by name.

    import mmke

    bench = mmke.load_benchmark("world")
    model = mmke.load_model("world", images=bench)
    editor = mmke.load_method("rome", model, train_cases=bench.train_cases)
    case = bench.cases[0]
    with editor.apply(model, case) as edited:        # the edit is undone on leaving the block
        print(edited.generate([case.edit]))          # the edited model's answer
        print(edited.score(case.probes)[0].token_accuracy)
    summary = mmke.evaluate(methods=["ft_llm", "grace"], limit=8)   # as `mmke run`

Every function resolves names and settings exactly as ``mmke run`` does (the same registries, the
method presets shipped beside a model, the same checks), so a result from Python is a result of
the CLI. docs/api.md has the whole surface.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmke.types import EditCase, EditFact, EditType, ImageRef, Probe, ProbeKind

if TYPE_CHECKING:
    from mmke.data.benchmark import Benchmark
    from mmke.data.images import ImageStore
    from mmke.eval.records import RunSummary
    from mmke.methods.base import Editor
    from mmke.models.base import LVLM


def load_model(
    name: str | Path = "world",
    *,
    images: Benchmark | ImageStore | str | Path | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> LVLM:
    """A model by bundled name ("world") or folder (a transformers checkpoint saved on disk).

    ``images``: where the model opens the images that probes name (a benchmark's image root, an
    ``ImageStore`` or a folder); without it the model answers text-only items only.
    """
    from mmke.models.base import LVLM

    return LVLM.load(
        str(name),
        dtype=dtype,
        device=device,
        images=_image_store(images),
        trust_remote_code=trust_remote_code,
    )


def load_benchmark(
    spec: str = "world", *, image_root: str | Path | None = None, skip_bad: bool = False, **options: Any
) -> Benchmark:
    """A benchmark by reader and file (``"vlkeb:eval_multihop.json"``; ``"world"`` is the embedded
    one), with its reader's ``options`` (``train=``, ``hop=`` …); bad records stop it unless ``skip_bad``."""
    from mmke.data.benchmark import load_benchmark as load

    root = None if image_root is None else Path(image_root)
    return load(spec, root, skip_bad=skip_bad, options=options)


def method_settings(name: str, model: LVLM, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The settings ``mmke run`` gives method ``name`` on ``model``: the presets shipped beside the
    model, overridden by ``options`` (as ``method_options.NAME.KEY=VALUE``)."""
    from mmke.config import RunConfig
    from mmke.eval.runner import method_options

    cfg = RunConfig(method_options={name: dict(options or {})})
    return method_options(model.source, cfg, name, model.layout)


def load_method(name: str, model: LVLM, *, train_cases: Sequence[EditCase] = (), **options: Any) -> Editor:
    """An editing method for ``model`` with ``method_settings``; a method that learns from a train
    split (SERAC's classifier, IKE's demonstrations, ROME's statistics…) is given ``train_cases``
    (without them it says, in one line, that it cannot run)."""
    from mmke.registry import methods

    editor = methods.get(name)(method_settings(name, model, options))
    if editor.needs_train_cases:
        editor.train(model, train_cases)
    return editor


def edit_case(
    prompt: str,
    target: str,
    *,
    image: str | None = None,
    ground_truth: str | None = None,
    probes: Sequence[Probe] = (),
    case_id: str = "edit",
    edit_type: EditType = EditType.VISUAL_ENTITY,
) -> EditCase:
    """One edit written by hand: ``prompt`` (+ ``image``, a path the model's image store opens)
    -> ``target``, measured by ``probes`` (default: its own reliability)."""
    fact = EditFact(prompt, target, None if image is None else ImageRef(image), ground_truth)
    return fact_case(fact, case_id=case_id, edit_type=edit_type, probes=probes)


def fact_case(
    fact: EditFact, *, case_id: str = "edit", edit_type: EditType | None = None, probes: Sequence[Probe] = ()
) -> EditCase:
    """The case that writes ``fact``, measured by ``probes`` (default: the fact asked again,
    reliability); its edit type, when not given: an insertion without a ground truth, else an entity edit."""
    kind = edit_type or (EditType.USER_SPECIFIC if fact.ground_truth is None else EditType.VISUAL_ENTITY)
    own = Probe(ProbeKind.RELIABILITY, fact.prompt, fact.target, fact.image, options=fact.options)
    return EditCase(case_id, kind, fact, tuple(probes) or (own,))


def evaluate(
    settings: Mapping[str, Any] | None = None,
    *,
    out: str | Path | None = None,
    run_id: str | None = None,
    workers: int = 0,
    **more: Any,
) -> RunSummary:
    """Run an evaluation as ``mmke run`` does and return its typed summary.

    Settings are ``mmke run``'s keys (``methods``, ``benchmark``, ``protocol``, ``limit``,
    ``method_options`` …; ``mmke run --help``), given as a mapping or as keywords; the run is
    saved under ``out`` (default: the config's, ``runs/``) in ``run_id``'s folder as the CLI saves it,
    so ``mmke report`` reads it. ``workers``: local worker processes (0: in this process).
    """
    from mmke.config import load_config
    from mmke.eval.executors import InProcess, LocalWorkers
    from mmke.eval.job import preflight, run
    from mmke.eval.runner import with_hparams
    from mmke.eval.store import RunStore

    given = {**(settings or {}), **more}
    if out is not None:
        given["out"] = str(out)
    cfg = with_hparams(load_config(settings=given))
    bench = preflight(cfg)
    store = RunStore.create(Path(cfg.out), run_id, cfg.to_dict())
    executor = LocalWorkers(workers) if workers else InProcess()
    return run(cfg, store, executor=executor, bench=bench)


def _image_store(images: Benchmark | ImageStore | str | Path | None) -> ImageStore | None:
    from mmke.data.benchmark import Benchmark
    from mmke.data.images import ImageStore

    if images is None or isinstance(images, ImageStore):
        return images
    if isinstance(images, Benchmark):
        return None if images.image_root is None else ImageStore(images.image_root)
    return ImageStore(Path(images))
