"""``mmke edit``: write facts into a model as lifelong editing does, and save the edited model.

An edit that only changed the values of existing weights (FT, LoRA once its adapters are merged,
ROME, MEMIT, AlphaEdit, UltraEdit, MEND, KE) is saved as a plain transformers folder any
``from_pretrained`` loads. An edit that added anything else (a module, a hook, a prompt, a side
model: SERAC, GRACE, WISE, IKE, T-Patcher, VisEdit, LiveEdit) is saved as an mmke edit state: the
edit log (method, resolved options, seed, base model, facts, train split) that ``load_edited``
replays onto the base model, checked against the answers the edited model gave when it was saved.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from mmke.api import fact_case
from mmke.config import key_values
from mmke.data.checks import FieldError, ImagePathChecks, loads_record, utf8_lines
from mmke.data.images import ImageStore
from mmke.data.schema import FORMAT, case_from_json, write_cases
from mmke.errors import BadRecordError, ConfigError, EditorNotReadyError, ModelLoadError
from mmke.methods.base import Edited, Editor, ParamEdited, swap_module
from mmke.models.base import LVLM, Item, ModalityError
from mmke.models.scoring import ScoredBatch
from mmke.types import EditCase, EditFact, EditType, ImageRef, ProbeKind

if TYPE_CHECKING:
    from rich.console import Console

log = logging.getLogger(__name__)

STATE_FILE = "mmke_state.json"
EDITS_FILE = "mmke_edits.jsonl"
EDIT_INFO_FILE = "mmke_edit.json"
CARD_FILE = "README.md"
IMAGES_DIR = "images"
STATE_FORMAT = "mmke-edit-state"
STATE_VERSION = 1
#: Method presets shipped beside a model (``mmke.eval.runner.PRESETS_FILE``), kept with its edit.
PRESETS_FILE = "mmke_methods.yaml"
#: The keys a simple facts file's records may have.
FACT_KEYS = frozenset({"prompt", "target", "image", "ground_truth"})

Kind = Literal["weights", "memory"]


# --- what is saved ------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSplit:
    """Where a method's train split comes from: a benchmark spec (``world``, ``native:FILE``…)."""

    spec: str
    image_root: str | None = None

    def benchmark(self) -> Any:
        from mmke.data.benchmark import load_benchmark

        return load_benchmark(self.spec, None if self.image_root is None else Path(self.image_root))


@dataclass(frozen=True)
class FactCheck:
    """One fact's teacher-forced score before and after the edits (the replay is checked against it)."""

    before: float  # token accuracy of the target on the unedited model
    after: float  # ... on the edited model
    nll: float  # target NLL on the edited model


@dataclass(frozen=True)
class EditLog:
    """Everything needed to make the edit again: ``load_edited`` replays it for a memory state."""

    method: str
    options: dict[str, Any]  # resolved: the model's presets, then the user's keys
    seed: int
    base_model: str  # a bundled model's name, or the base folder's absolute path
    dtype: str
    cases: tuple[EditCase, ...]  # one per fact, in the order they were written
    train: TrainSplit | None = None
    checks: tuple[FactCheck, ...] = ()
    #: What the edit added besides weight values (empty for a weight edit).
    added: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "method": self.method,
            "options": self.options,
            "seed": self.seed,
            "base_model": self.base_model,
            "dtype": self.dtype,
            "facts": EDITS_FILE,
            "train": None if self.train is None else asdict(self.train),
            "checks": [asdict(c) for c in self.checks],
            "added": list(self.added),
        }


@dataclass(frozen=True)
class Saved:
    """What ``edit_and_save`` wrote: a transformers folder (``weights``) or an mmke edit state."""

    path: Path
    kind: Kind
    log: EditLog
    #: Weight edits: the tensors whose values changed; memory edits: what the edit added.
    changed: tuple[str, ...] = field(default=())


# --- reading facts ------------------------------------------------------------------------


def read_facts(path: Path, image_root: Path | None = None) -> tuple[tuple[EditCase, ...], Path | None]:
    """The facts of ``path`` as one case each, and the folder their images are in.

    A native case file (``mmke.data.schema``) gives each case's edit and then its companion
    facts; any other JSONL file is read as one fact per line: ``{prompt, target, image?,
    ground_truth?}``, images relative to ``image_root`` (default: the file's folder).
    """
    first = _first_record(path)
    if isinstance(first, dict) and first.get("format") == FORMAT:
        from mmke.data.benchmark import load_benchmark

        bench = load_benchmark(f"native:{path}", image_root)
        facts = [(c.case_id, c.edit_type, f) for c in bench.cases for f in (c.edit, *c.companions)]
        return _fact_cases(facts), bench.image_root
    root = image_root if image_root is not None else path.parent
    checks = ImagePathChecks(root, decode=True)
    facts = []
    for lineno, line in utf8_lines(path.read_bytes()):
        if line is None:
            raise BadRecordError(f"{path}:{lineno}: line is not UTF-8 text")
        if line.strip():
            facts.append((f"fact-{lineno}", None, _simple_fact(line, checks, f"{path}:{lineno}")))
    if not facts:
        raise BadRecordError(
            f"{path}: no facts (one JSON object per line: prompt, target, image?, ground_truth?)"
        )
    return _fact_cases(facts), root


def _first_record(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            line = f.readline()
    except OSError as e:
        raise BadRecordError(f"{path}: cannot open: {e.strerror}") from None
    with suppress(ValueError, FieldError):
        return loads_record(line.decode("utf-8"))
    return None


def _simple_fact(line: str, checks: ImagePathChecks, where: str) -> EditFact:
    """One ``{prompt, target, image?, ground_truth?}`` line, checked as strictly as a native edit."""
    try:
        rec = loads_record(line)
        if not isinstance(rec, dict):
            raise FieldError("a fact must be a JSON object")
        unknown = sorted(set(rec) - FACT_KEYS)
        if unknown:
            raise FieldError(f"unknown key {unknown[0]!r} (a fact has {', '.join(sorted(FACT_KEYS))})")
        probe = {
            "kind": ProbeKind.RELIABILITY.value,
            "prompt": rec.get("prompt"),
            "target": rec.get("target"),
        }
        native = {"id": "fact", "edit_type": EditType.VISUAL_ENTITY.value, "edit": rec, "probes": [probe]}
        return case_from_json(native, checks).edit
    except ValueError as e:
        raise BadRecordError(f"{where}: invalid JSON ({e})") from None
    except FieldError as e:
        raise BadRecordError(f"{where}: {e}") from None


def _fact_cases(facts: Sequence[tuple[str, EditType | None, EditFact]]) -> tuple[EditCase, ...]:
    seen: dict[str, int] = {}
    out = []
    for case_id, edit_type, fact in facts:
        n = seen[case_id] = seen.get(case_id, -1) + 1  # a case's companions share its id
        out.append(
            fact_case(fact, case_id=case_id if n == 0 else f"{case_id}/companion-{n}", edit_type=edit_type)
        )
    return tuple(out)


# --- images -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditImages:
    """The images an edit opens: the facts' from their folder, the train split's from its own.

    A path one of the facts names is opened from the facts' folder; any other from the train
    split's (a train image with the same relative path as a fact's is shadowed by it).
    """

    facts: ImageStore | None
    train: ImageStore | None
    fact_paths: frozenset[str]

    def open(self, ref: ImageRef) -> Any:
        store = self.facts if ref.path in self.fact_paths or self.train is None else self.train
        if store is None:
            raise ModalityError(f"image {ref.path!r}: no image folder given for it (--image-root)")
        return store.open(ref)


def _images(cases: Sequence[EditCase], root: Path | None, train_root: Path | None) -> EditImages | None:
    paths = frozenset(c.edit.image.path for c in cases if c.edit.image is not None)
    if root is None and train_root is None:
        return None
    return EditImages(
        None if root is None else ImageStore(root),
        None if train_root is None else ImageStore(train_root),
        paths,
    )


# --- the edit -----------------------------------------------------------------------------


def edit_and_save(
    model: str | Path,
    method: str,
    cases: Sequence[EditCase],
    out: Path,
    *,
    options: Mapping[str, Any] | None = None,
    image_root: Path | None = None,
    train: TrainSplit | None = None,
    seed: int = 0,
    dtype: str | None = None,
    device: str | None = None,
    overwrite: bool = False,
) -> Saved:
    """Write every fact of ``cases`` (one case each, e.g. from ``read_facts``) into ``model`` in
    order, stacked as lifelong editing does, and save the edited model to ``out``.

    The editor is built as ``mmke run`` builds it (the model's presets, then ``options``) and
    trained on ``train``'s split when the method needs one; the model loads in ``dtype``
    (default float32, as ``mmke run``) on ``device`` (default cpu). A weight edit is saved as a
    transformers folder, anything else as an mmke edit state (see the module's docstring).
    """
    from mmke.registry import methods

    if Path(model).exists() and Path(model).resolve() == out.resolve():
        raise ConfigError(f"{out} is the model being edited: choose another --out")
    _check_out(out, overwrite)
    methods.get(method)  # an unknown method fails here, before the model loads
    if not cases:
        raise ConfigError("mmke edit: no facts to write (give --edits FILE or --prompt and --target)")
    done = _edit(model, method, cases, options, image_root, train, seed, dtype or "float32", device or "cpu")
    with _fresh_folder(out, overwrite) as tmp:
        if done.log.added:
            changed = done.log.added
            _write_state(tmp, done.log)
        else:
            changed = changed_tensors(done.model.model, done.handles, done.merged)
            _write_weights(tmp, done.model, done.log, changed)
        _write_common(tmp, done.log, done.editor.config, image_root, changed)
    return Saved(out, "memory" if done.log.added else "weights", done.log, changed)


@dataclass(frozen=True)
class _Done:
    """An edit made in memory: the edited model, its editor and handles, and its log."""

    model: LVLM
    editor: Editor
    handles: list[Edited]
    merged: list[str]  # the layers whose LoRA adapters were merged
    log: EditLog


def _edit(
    model: str | Path,
    method: str,
    cases: Sequence[EditCase],
    options: Mapping[str, Any] | None,
    image_root: Path | None,
    train: TrainSplit | None,
    seed: int,
    dtype: str,
    device: str,
) -> _Done:
    """Load, build the editor, write every fact, and find out whether only weight values changed."""
    from mmke.models._loading import resolve_bundled

    bench = None if train is None else train.benchmark()
    images = _images(cases, image_root, None if bench is None else bench.image_root)
    lvlm = LVLM.load(model, dtype=dtype, device=device, images=images)
    check_facts(lvlm, cases, image_root)
    with _train_split_hint(train):
        editor, resolved = build_editor(lvlm, method, options, () if bench is None else bench.train_cases)
        before = lvlm.score([c.edit for c in cases])
        structure = Structure.of(lvlm.model)
        handles = apply_facts(lvlm, editor, cases, seed)
    merged = merge_adapters(lvlm.model)
    added = structure.added(Structure.of(lvlm.model)) + routed(handles)
    after = handles[-1].score([c.edit for c in cases])
    edit_log = EditLog(
        method=method,
        options=resolved,
        seed=seed,
        base_model=str(model) if resolve_bundled(str(model)) is not None else str(Path(model).resolve()),
        dtype=str(lvlm.dtype).removeprefix("torch."),
        cases=tuple(cases),
        train=train,
        checks=checks(before, after),
        added=tuple(added),
    )
    return _Done(lvlm, editor, handles, merged, edit_log)


def check_facts(model: LVLM, cases: Sequence[EditCase], image_root: Path | None) -> None:
    """Refuse, before anything is edited, a fact whose image the model cannot take or open."""
    for c in cases:
        image = c.edit.image
        if image is None:
            continue
        if not model.family.multimodal:
            raise ModalityError(
                f"fact {c.case_id}: has image {image.path!r} but {model.family.name} is text-only"
            )
        if image_root is None:
            raise ModalityError(
                f"fact {c.case_id}: has image {image.path!r} but no image folder (--image-root)"
            )


def build_editor(
    model: LVLM, method: str, options: Mapping[str, Any] | None, train_cases: Sequence[EditCase]
) -> tuple[Editor, dict[str, Any]]:
    """The editor ``mmke run`` would build for ``method`` on ``model``, and the options it was built
    from (plain JSON data: tuples as lists)."""
    from mmke.api import load_method, method_settings

    resolved = method_settings(method, model, options)
    editor = load_method(method, model, train_cases=train_cases, **resolved)
    return editor, json.loads(json.dumps(resolved, default=str))


@contextmanager
def _train_split_hint(train: TrainSplit | None) -> Iterator[None]:
    """A method that finds no train split says so; without one given, this adds how to give it."""
    try:
        yield
    except EditorNotReadyError as e:
        if train is not None:
            raise
        raise EditorNotReadyError(
            f"{e} (pass --benchmark for a train split, e.g. --benchmark world)"
        ) from None


def apply_facts(model: LVLM, editor: Editor, cases: Sequence[EditCase], seed: int) -> list[Edited]:
    """Every case written in order and kept (lifelong editing), each under the runner's seed for
    its stream position; an in-context method gets all of them in one context, as its handle
    holds only the facts written through it. On failure everything written is undone."""
    stack: list[Edited] = []
    try:
        if editor.in_context:
            torch.manual_seed(seed * 1_000_003)
            stack.append(editor.apply_many(model, cases))
        for index, case in enumerate(() if editor.in_context else cases):
            torch.manual_seed(seed * 1_000_003 + index)
            stack.append(editor.apply(model, case))
    except BaseException:
        for handle in reversed(stack):
            handle.restore()
        raise
    return stack


def checks(before: ScoredBatch, after: ScoredBatch) -> tuple[FactCheck, ...]:
    return tuple(
        FactCheck(round(b.token_accuracy, 6), round(a.token_accuracy, 6), round(a.nll, 6))
        for b, a in zip(before, after, strict=True)
    )


# --- weight edit or memory edit -----------------------------------------------------------


@dataclass(frozen=True)
class Structure:
    """What a model is besides its weight values: module classes, state_dict keys, hooks."""

    modules: dict[str, str]
    keys: frozenset[str]
    hooks: dict[str, int]

    @classmethod
    def of(cls, model: nn.Module) -> Structure:
        modules = {name: type(m).__qualname__ for name, m in model.named_modules()}
        hooks = {
            name: n
            for name, m in model.named_modules()
            if (n := len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks))
        }
        return cls(modules, frozenset(model.state_dict()), hooks)

    def added(self, now: Structure) -> list[str]:
        """What ``now`` has that this structure had not, one line each (none: only values changed)."""
        out = [
            f"module {name or '<root>'}: {cls}"
            + (f" (was {self.modules[name]})" if name in self.modules else "")
            for name, cls in now.modules.items()
            if self.modules.get(name) != cls
        ]
        new_keys = now.keys - self.keys
        if new_keys:
            out.append(f"{len(new_keys)} state tensor(s), e.g. {min(new_keys)}")
        out += [
            f"{n - self.hooks.get(name, 0)} hook(s) on {name or '<root>'}"
            for name, n in now.hooks.items()
            if n > self.hooks.get(name, 0)
        ]
        return out


def routed(handles: Sequence[Edited]) -> list[str]:
    """The handles that answer through something besides the model's weights (a rewritten prompt,
    a route per item): their edit lives outside the model."""
    plain = (Edited.view, Edited.score, Edited.generate)
    return sorted(
        {
            f"{type(h).__name__}: answers through the edit handle (prompt or routing)"
            for h in handles
            if (type(h).view, type(h).score, type(h).generate) != plain
        }
    )


def merge_adapters(model: nn.Module) -> list[str]:
    """Fold every peft adapter into the weight it wraps and put the plain layer back (LoRA's edit
    becomes a weight edit); returns the merged module names."""
    names = [n for n, m in model.named_modules() if type(m).__module__.startswith("peft.")]
    if not names:
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuners = [n for n in names if isinstance(model.get_submodule(n), BaseTunerLayer)]
    outer = [n for n in tuners if not any(n.startswith(f"{o}.") for o in tuners)]
    for name in outer:
        layer = model.get_submodule(name)
        while isinstance(layer, BaseTunerLayer):  # stacked edits: wrappers around wrappers
            layer.merge()  # into the innermost base layer's weight
            layer = layer.base_layer
        swap_module(model, name, layer)
    return outer


def changed_tensors(model: nn.Module, handles: Sequence[Edited], merged: Sequence[str]) -> tuple[str, ...]:
    """The weights whose values the edits changed: from the handles' snapshots (the first one of a
    weight holds its unedited value) and the layers LoRA adapters were merged into."""
    first: dict[str, torch.Tensor] = {}
    for h in handles:
        if isinstance(h, ParamEdited):
            for name, value in h.snapshot.items():
                first.setdefault(name, value)
    params = dict(model.named_parameters())
    moved = {n for n, v in first.items() if n in params and not torch.equal(params[n].detach(), v)}
    return tuple(sorted(moved | {f"{n}.weight" for n in merged}))


# --- writing ------------------------------------------------------------------------------


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file: --out needs a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} is not empty: choose a new folder, or --overwrite an earlier edit")
        if not (out / EDITS_FILE).is_file():  # never delete a folder that `mmke edit` did not write
            raise ConfigError(f"{out} was not written by mmke edit (no {EDITS_FILE}): --overwrite refuses it")


@contextmanager
def _fresh_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside ``out`` that becomes ``out`` when the block ends (a failed save
    leaves nothing half-written; the folder it replaces is removed only then)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes 0700; this is an output like any other
        old = None
        if out.exists():
            _check_out(out, overwrite)
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_weights(tmp: Path, model: LVLM, edit_log: EditLog, changed: Sequence[str]) -> None:
    model.model.save_pretrained(tmp, safe_serialization=True)
    model.processor.save_pretrained(tmp)
    if model.source is not None and (model.source / PRESETS_FILE).is_file():
        shutil.copyfile(model.source / PRESETS_FILE, tmp / PRESETS_FILE)
    info = edit_log.to_json() | {"format": "mmke-edit-weights", "changed": list(changed)}
    info.pop("added")
    (tmp / EDIT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _write_state(tmp: Path, edit_log: EditLog) -> None:
    (tmp / STATE_FILE).write_text(json.dumps(edit_log.to_json(), indent=2) + "\n", encoding="utf-8")


def _write_common(
    tmp: Path, edit_log: EditLog, config: Any, image_root: Path | None, changed: Sequence[str]
) -> None:
    """The facts (native JSONL, images copied beside them) and the model card."""
    header = {"benchmark": f"mmke-edit-{edit_log.method}", "image_root": IMAGES_DIR}
    write_cases(tmp / EDITS_FILE, edit_log.cases, header)
    for path in sorted({c.edit.image.path for c in edit_log.cases if c.edit.image is not None}):
        assert image_root is not None  # check_facts refused images without a folder
        (tmp / IMAGES_DIR / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image_root / path, tmp / IMAGES_DIR / path)
    (tmp / CARD_FILE).write_text(model_card(edit_log, config, changed), encoding="utf-8")


def model_card(edit_log: EditLog, config: Any, changed: Sequence[str]) -> str:
    """README.md: the method, its options (all of its config), the base model and every edit."""
    n, method = len(edit_log.cases), edit_log.method
    kind = "memory" if edit_log.added else "weights"
    head = "---\nlibrary_name: transformers\n" if kind == "weights" else "---\n"
    head += f"tags:\n- mmke\n- knowledge-editing\n- {method}\n---\n\n"
    title = f"# {edit_log.base_model} edited with {method} ({n} edit{'s' * (n != 1)})\n\n"
    how = (
        f"Written by `mmke edit`: the facts below were written in order and kept (lifelong editing), "
        f"seed {edit_log.seed}, {edit_log.dtype}. "
    )
    if kind == "weights":
        how += (
            "Only weight values changed, so this is a plain transformers folder: load it with "
            "`from_pretrained` or `mmke.models.LVLM.load`.\n\n"
            f"Changed tensors ({len(changed)}): " + ", ".join(f"`{c}`" for c in changed) + "\n\n"
        )
    else:
        how += (
            f"The edit added what transformers cannot load, so this folder is NOT a model: it is the "
            f"edit log ({STATE_FILE}), which `mmke.saving.load_edited(path)` (and `mmke chat`) replays onto "
            f"the base model, checking that the edited model answers as it did when saved.\n\n"
            "What the edit added: " + "; ".join(edit_log.added) + "\n\n"
        )
    train = "" if edit_log.train is None else f"Train split: `{edit_log.train.spec}`.\n\n"
    return head + title + how + train + _options_section(edit_log, config) + _edits_table(edit_log)


def _options_section(edit_log: EditLog, config: Any) -> str:
    values = asdict(config) if is_dataclass(config) else dict(edit_log.options)
    rows = "".join(f"| {_cell(k)} | {_cell(json.dumps(v, default=str))} |\n" for k, v in values.items())
    return f"## Method: {edit_log.method}\n\n| option | value |\n|---|---|\n{rows}\n"


def _edits_table(edit_log: EditLog) -> str:
    rows = ""
    for i, c in enumerate(edit_log.cases, start=1):
        f = c.edit
        score = edit_log.checks[i - 1] if edit_log.checks else None
        result = "" if score is None else f"{score.before:.0%} → {score.after:.0%}"
        image = "" if f.image is None else f"`{IMAGES_DIR}/{f.image.path}`"
        cells = [str(i), _cell(f.prompt), image, _cell(f.ground_truth or ""), _cell(f.target), result]
        rows += "| " + " | ".join(cells) + " |\n"
    return (
        f"## Edits\n\nAlso in `{EDITS_FILE}` (mmke's native case format). Last column: the target's "
        "teacher-forced token accuracy before → after the edits.\n\n"
        "| # | prompt | image | old answer | new answer | target tokens right |\n|---|---|---|---|---|---|\n"
        + rows
    )


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


# --- loading ------------------------------------------------------------------------------


class EditedModel:
    """A base model with a saved memory edit replayed onto it: ``score`` and ``generate`` go
    through the edit; ``restore()`` takes it off again (newest first)."""

    def __init__(self, model: LVLM, handles: Sequence[Edited], edit_log: EditLog) -> None:
        self.model = model
        self.handles = list(handles)
        self.log = edit_log

    def __repr__(self) -> str:
        return f"EditedModel({self.log.method}, {len(self.log.cases)} edits on {self.log.base_model})"

    def score(self, items: Sequence[Item], *, batch_size: int = 32, topk: int = 10) -> ScoredBatch:
        return self.handles[-1].score(items, batch_size=batch_size, topk=topk)

    def generate(self, items: Sequence[Item], *, max_new_tokens: int = 16, batch_size: int = 32) -> list[str]:
        return self.handles[-1].generate(items, max_new_tokens=max_new_tokens, batch_size=batch_size)

    def restore(self) -> None:
        for handle in reversed(self.handles):
            handle.restore()


def load_edited(
    path: str | Path, *, device: str | None = None, dtype: str | None = None, images: Any = None
) -> LVLM | EditedModel:
    """What ``mmke edit`` saved at ``path``, ready to ``score`` and ``generate``.

    A weight folder loads as an ``LVLM``. A memory state loads its base model, trains the editor
    as it was trained, replays the facts under the same seeds, and refuses the result when a fact
    is answered differently than when it was saved (a changed base model or editor). ``images``
    (an ``ImageStore``) is bound for the items asked afterwards.
    """
    path, device = Path(path), device or "cpu"
    if (path / STATE_FILE).is_file():
        return _replay(path, device, dtype, images)
    if (path / "config.json").is_file():
        return LVLM.load(path, dtype=dtype or "auto", device=device, images=images)
    raise ModelLoadError(f"{path}: not an edited model (neither {STATE_FILE} nor config.json)")


def read_state(path: Path) -> EditLog:
    """The edit log of the memory state at ``path`` (its facts read from ``mmke_edits.jsonl``)."""
    from mmke.data.schema import read_cases

    try:
        raw = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path / STATE_FILE}: unreadable ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT or raw.get("version") != STATE_VERSION:
        raise ModelLoadError(f"{path / STATE_FILE}: not an mmke edit state of version {STATE_VERSION}")
    try:
        train = None if raw["train"] is None else TrainSplit(**raw["train"])
        return EditLog(
            raw["method"],
            dict(raw["options"]),
            int(raw["seed"]),
            str(raw["base_model"]),
            str(raw["dtype"]),
            tuple(read_cases(path / EDITS_FILE, path / IMAGES_DIR)),
            train,
            tuple(FactCheck(**c) for c in raw["checks"]),
            tuple(raw["added"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{path / STATE_FILE}: bad field ({type(e).__name__}: {e})") from None


def _replay(path: Path, device: str, dtype: str | None, images: Any) -> EditedModel:
    from mmke.registry import methods

    edit_log = read_state(path)
    bench = None if edit_log.train is None else edit_log.train.benchmark()
    store = _images(edit_log.cases, path / IMAGES_DIR, None if bench is None else bench.image_root)
    model = LVLM.load(edit_log.base_model, dtype=dtype or edit_log.dtype, device=device, images=store)
    editor = methods.get(edit_log.method)(edit_log.options)
    if editor.needs_train_cases:
        editor.train(model, () if bench is None else bench.train_cases)
    handles = apply_facts(model, editor, edit_log.cases, edit_log.seed)
    after = handles[-1].score([c.edit for c in edit_log.cases])
    _check_replay(path, edit_log, after)
    if images is not None:
        model.bind_images(images)
    return EditedModel(model, handles, edit_log)


def _check_replay(path: Path, edit_log: EditLog, after: ScoredBatch) -> None:
    """The replayed edit must answer every fact as the saved one did (token accuracy); a drift of
    the NLL alone (another device or dtype) is only logged."""
    for case, saved, now in zip(edit_log.cases, edit_log.checks, after, strict=True):
        if abs(now.token_accuracy - saved.after) > 1e-6:
            raise ModelLoadError(
                f"{path}: replaying the edits did not give the saved model (fact {case.case_id}: "
                f"{saved.after:.0%} of the target's tokens right when saved, {now.token_accuracy:.0%} now); "
                f"was the base model {edit_log.base_model} or the method's editor changed?"
            )
        if abs(now.nll - saved.nll) > 1e-3 * (1 + abs(saved.nll)):
            log.warning(
                "%s: fact %s: NLL %.4f after replay, %.4f when saved", path, case.case_id, now.nll, saved.nll
            )


# --- the command line ---------------------------------------------------------------------


def add_edit_parser(sub: argparse._SubParsersAction) -> None:
    """``mmke edit MODEL --method M (--edits FILE | --prompt P --target T …) --out DIR``."""
    ed = sub.add_parser(
        "edit",
        help="write facts into a model (lifelong, in order) and save the edited model",
        description=(
            "A weight edit (ft_*, lora merged, rome, memit, alphaedit, ultraedit, mend, ke) is saved as a "
            "transformers folder; any other (serac, grace, wise, ike, tpatcher, visedit, liveedit) as an "
            "mmke edit state that mmke.saving.load_edited / mmke chat replays onto the base model."
        ),
    )
    ed.add_argument("model", help="a model directory or a bundled model name (world)")
    ed.add_argument("--method", required=True, help="an editing method (`mmke list methods`)")
    facts = ed.add_mutually_exclusive_group(required=True)
    facts.add_argument(
        "--edits",
        type=Path,
        help="a JSONL file: native cases, or one {prompt, target, image?, ground_truth?} per line",
    )
    facts.add_argument("--prompt", help="one fact's prompt (with --target)")
    ed.add_argument("--target", help="the new answer of --prompt")
    ed.add_argument("--image", type=Path, help="the image --prompt asks about")
    ed.add_argument("--ground-truth", help="the answer --prompt had before the edit")
    ed.add_argument("--out", type=Path, required=True, help="a new (or empty) folder")
    ed.add_argument("--image-root", type=Path, help="the folder the facts' image paths are in")
    ed.add_argument("--benchmark", help="the train split for methods that need one, e.g. world")
    ed.add_argument("--overwrite", action="store_true", help="replace an earlier mmke edit output at --out")
    ed.add_argument("--seed", type=int, default=0)
    ed.add_argument("--device", default="cpu")
    ed.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    ed.add_argument("options", nargs="*", metavar="key=value", help="the method's settings, e.g. steps=20")
    ed.set_defaults(func=cmd_edit)


def cmd_edit(args: argparse.Namespace, console: Console) -> int:
    """Run ``mmke edit`` and say what was written."""
    from mmke.config import DTYPES

    if args.dtype not in DTYPES:
        raise ConfigError(f"--dtype {args.dtype!r}: one of {', '.join(DTYPES)}")
    cases, root = _cli_facts(args)
    train = None if args.benchmark is None else TrainSplit(args.benchmark)
    saved = edit_and_save(
        args.model,
        args.method,
        cases,
        args.out,
        options=key_values(args.options, "method setting", "steps=20"),
        image_root=root,
        train=train,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
        overwrite=args.overwrite,
    )
    right = sum(c.after == 1.0 for c in saved.log.checks)
    n = len(saved.log.cases)
    if saved.kind == "weights":
        what = f"a transformers folder ({len(saved.changed)} tensor(s) changed)"
    else:
        what = "an mmke edit state (load with mmke.saving.load_edited or mmke chat; not a transformers model)"
    console.print(
        f"wrote {args.out}: {args.method}, {n} edit(s), {right} answered exactly after editing; {what}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return 0


def _cli_facts(args: argparse.Namespace) -> tuple[tuple[EditCase, ...], Path | None]:
    if args.edits is not None:
        if args.target or args.image or args.ground_truth:
            raise ConfigError("--target, --image and --ground-truth go with --prompt, not --edits")
        return read_facts(args.edits, args.image_root)
    if not args.target:
        raise ConfigError("--prompt needs --target (the new answer)")
    ref, root = None, args.image_root
    if args.image is not None:
        root = root if root is not None else args.image.parent
        try:
            ref = args.image.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            raise ConfigError(f"--image {args.image} is not inside --image-root {root}") from None
        why = ImagePathChecks(root, decode=True)(ref)
        if why:
            raise BadRecordError(f"--image {args.image}: {why}")
    fact = EditFact(args.prompt, args.target, None if ref is None else ImageRef(ref), args.ground_truth)
    return (fact_case(fact, case_id="fact-1"),), root


__all__ = [
    "EditLog",
    "EditedModel",
    "FactCheck",
    "Saved",
    "TrainSplit",
    "add_edit_parser",
    "cmd_edit",
    "edit_and_save",
    "load_edited",
    "read_facts",
    "read_state",
]
