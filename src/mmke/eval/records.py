"""What a run writes, as types: one ``CaseRecord`` per scored case, the ``RunInfo`` and the ``RunSummary``.

The runner builds these, the store writes them (``cases.jsonl``, ``summary.json``) and summary,
report and compare read only them. Each carries its schema version: ``from_json`` reads every
version mmke ever wrote (missing fields of older records take their defaults) and refuses one
it does not know, naming it; ``to_json`` writes the current one, as one canonical JSON line
(sorted keys, so equal data gives equal bytes).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from mmke.data.schema import dumps_line
from mmke.errors import BadRecordError

RECORD_SCHEMA = "mmke-case/1"
SUMMARY_SCHEMA = "mmke-summary/1"
#: Every schema ``from_json`` reads (oldest first); a record without one predates versioning.
RECORD_SCHEMAS = (RECORD_SCHEMA,)
SUMMARY_SCHEMAS = (SUMMARY_SCHEMA,)
STATUSES = ("ok", "collapsed", "error")

#: What makes a case record unique in a run: (method, protocol, gap, checkpoint, case_id).
ResumeKey = tuple[Any, Any, Any, Any, str]


def _known(cls: type, data: Mapping[str, Any], what: str) -> dict[str, Any]:
    """The fields of ``cls`` found in ``data``; an unknown key is a newer writer's, so refuse it."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise BadRecordError(f"{what}: unknown field(s) {', '.join(unknown)} (written by a newer mmke?)")
    return {k: v for k, v in data.items() if k in names}


def _check_schema(data: Mapping[str, Any], known: Sequence[str], what: str) -> None:
    schema = data.get("schema", known[0])
    if schema not in known:
        raise BadRecordError(f"{what}: schema {schema!r} is not one this mmke reads ({', '.join(known)})")


@dataclass(frozen=True)
class Provenance:
    """Which definitions produced a result: the paper protocol (``scoring=``) and what it fixed.

    Results whose ``comparable_group`` differs were computed by different definitions and do not
    belong in one table unasked (``mmke compare`` refuses them).
    """

    protocol: str
    version: int
    scorer: str
    prompt_format: str
    locality: str
    averaging: str = "macro"
    emulate: tuple[str, ...] = ()
    comparable_group: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "emulate": list(self.emulate)}  # as JSON gives it back

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> Provenance:
        values = _known(cls, data, f"{where}: provenance")
        values["emulate"] = tuple(values.get("emulate") or ())
        try:
            return cls(**values)
        except TypeError as e:
            raise BadRecordError(f"{where}: provenance: {e}") from None


def _drop_unset(out: dict[str, Any], names: Sequence[str]) -> None:
    """Leave out fields a later version added while they are unset (None or empty)."""
    for name in names:
        if out.get(name) in (None, {}, [], ()):
            out.pop(name, None)


def _put_provenance(out: dict[str, Any], provenance: Provenance | None) -> None:
    # An older result without one is written back as it was read, byte for byte.
    if provenance is None:
        out.pop("provenance", None)
    else:
        out["provenance"] = provenance.to_dict()


def _provenance(data: Any, where: str) -> Provenance | None:
    if data is None:  # written before provenance was recorded
        return None
    if not isinstance(data, Mapping):
        raise BadRecordError(f"{where}: provenance is a JSON object")
    return Provenance.from_dict(data, where)


@dataclass(frozen=True)
class RunBlock:
    """Which run, method and protocol step a record belongs to (the record's ``run`` object)."""

    model: str | None = None
    method: str | None = None
    benchmark: str | None = None
    benchmark_version: str | None = None
    protocol: str = "single"
    gap: int | None = None
    checkpoint: int | None = None
    seed: int | None = None
    config_hash: str | None = None
    scoring: str = "mmke"
    provenance: Provenance | None = None

    #: The fields that identify a summary group (besides the edit type).
    GROUP_KEYS = ("model", "method", "protocol", "gap", "checkpoint")

    @property
    def group(self) -> tuple[Any, ...]:
        return tuple(getattr(self, k) for k in self.GROUP_KEYS)


@dataclass(frozen=True)
class EditText:
    """The edit as asked: its prompt, new target and (for counterfactual edits) the old answer."""

    prompt: str
    target: str
    ground_truth: str | None = None


@dataclass(frozen=True)
class ProbeResult:
    """One probe's scores, as stored in a case record's ``probes`` list."""

    kind: str
    hop: int | None
    attack: str | None
    token_accuracy: float
    exact_match: float
    nll: float
    agreement: float | None = None
    generated: str | None = None
    generated_match: float | None = None
    #: How many ids the value averages over (target tokens; for locality, the compared ids):
    #: a token-pooled (micro) average weighs the probe by it. None in records before it.
    n_tokens: int | None = None
    #: Locality by generation: the unedited model's answer that ``generated`` is compared with.
    pre_generated: str | None = None
    #: The judge's verdict on ``generated`` (CORRECT / INCORRECT, or SAME / DIFFERENT against
    #: ``pre_generated`` for locality), its reply, or why judging failed (then no verdict).
    judge_verdict: str | None = None
    judge_reply: str | None = None
    judge_error: str | None = None
    #: The probe's ``group`` and ``variant`` (a neighbour list, a multi-hop chain and paraphrase).
    group: str | None = None
    variant: int | None = None
    #: ``generated`` scored as MMKU-Bench does, over the whole output: VQAEval's whole-word
    #: containment of the target (or an alias), and SQuAD token F1 (best over target and aliases).
    generated_vqa: float | None = None
    generated_f1: float | None = None

    #: Fields later mmke versions added: left out of a record while unset, so older records
    #: are written back byte for byte.
    ADDED_LATER = (
        "n_tokens",
        "pre_generated",
        "judge_verdict",
        "judge_reply",
        "judge_error",
        "group",
        "variant",
        "generated_vqa",
        "generated_f1",
    )

    @property
    def judge_score(self) -> float | None:
        """1.0 for CORRECT / SAME, 0.0 for INCORRECT / DIFFERENT, None when not (or not well) judged."""
        if self.judge_verdict is None:
            return None
        return 1.0 if self.judge_verdict in ("CORRECT", "SAME") else 0.0


@dataclass(frozen=True)
class CaseRecord:
    """One case of one method under one protocol step: its scores, cost and outcome.

    ``status`` is "ok", "collapsed" (the edited model diverged or answers nothing; ``collapsed_at``
    is the edit index) or "error" (the edit raised; ``message`` says what). ``metrics`` holds the
    per-case token-accuracy means, ``exact_match`` the exact-match ones, ``base`` the unedited
    model's on the same probes; a failed case has none of them.
    """

    run: RunBlock
    case_id: str
    edit_type: str
    index: int
    edit: EditText
    status: str = "ok"
    message: str | None = None
    collapsed_at: int | None = None
    efficiency: Mapping[str, float] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    exact_match: Mapping[str, float] = field(default_factory=dict)
    base: Mapping[str, float] = field(default_factory=dict)
    probes: tuple[ProbeResult, ...] = ()
    schema: str = RECORD_SCHEMA
    #: Per-case means of the free-generation match and of the judge's verdicts (evaluation=),
    #: and the unedited model's generation match on the same probes.
    generated: Mapping[str, float] = field(default_factory=dict)
    judged: Mapping[str, float] = field(default_factory=dict)
    base_generated: Mapping[str, float] = field(default_factory=dict)
    #: Per-case means of the generations' VQA accuracy and token F1 (MMKU-Bench's measures).
    generated_vqa: Mapping[str, float] = field(default_factory=dict)
    generated_f1: Mapping[str, float] = field(default_factory=dict)
    #: The case's task type (``EditCase.task``), None when its benchmark has none.
    task: str | None = None

    #: Sections later versions added: left out while empty (older records stay byte-identical).
    ADDED_LATER = ("generated", "judged", "base_generated", "generated_vqa", "generated_f1")

    @property
    def key(self) -> ResumeKey:
        r = self.run
        return (r.method, r.protocol, r.gap, r.checkpoint, self.case_id)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        out = {**asdict(self), "schema": RECORD_SCHEMA}
        _put_provenance(out["run"], self.run.provenance)
        _drop_unset(out, (*self.ADDED_LATER, "task"))
        for probe in out["probes"]:
            _drop_unset(probe, ProbeResult.ADDED_LATER)
        return out

    def to_json(self) -> str:
        return dumps_line(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "record") -> CaseRecord:
        if not isinstance(data, Mapping):
            raise BadRecordError(f"{where}: a case record is a JSON object")
        _check_schema(data, RECORD_SCHEMAS, where)
        try:
            values = _known(cls, data, where)
            run = _known(RunBlock, data.get("run") or {}, f"{where}: run")
            run["provenance"] = _provenance(run.get("provenance"), where)
            values["run"] = RunBlock(**run)
            values["edit"] = EditText(**_known(EditText, data.get("edit") or {}, f"{where}: edit"))
            values["probes"] = tuple(
                ProbeResult(**_known(ProbeResult, p, f"{where}: probe")) for p in data.get("probes") or ()
            )
            for name in ("efficiency", "metrics", "exact_match", "base", *cls.ADDED_LATER):
                values[name] = dict(data.get(name) or {})
            record = cls(**values)
        except TypeError as e:  # a required field missing
            raise BadRecordError(f"{where}: {e}") from None
        if record.status not in STATUSES:
            raise BadRecordError(f"{where}: status {record.status!r} is not one of {', '.join(STATUSES)}")
        return record

    @classmethod
    def from_json(cls, line: str, where: str = "record") -> CaseRecord:
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadRecordError(f"{where}: not a JSON record ({e.msg})") from None
        return cls.from_dict(data, where)


@dataclass(frozen=True)
class RunInfo:
    """What a summary says about its run as a whole.

    A finished run knows its resolved ``config``, the options each method ran with, the methods
    that could not run and how many benchmark records were skipped. A summary rebuilt from records
    alone (``mmke report`` on a run cut short) knows only what every record shares: ``common``.
    ``hparams``: per method given an anchor hparams file, the file and the keys mmke did not use
    (with why) or mapped differently (``mmke.methods.hparams.Hparams.record``).
    """

    config: Mapping[str, Any] | None = None
    config_hash: str | None = None
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    hparams: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    not_run: Mapping[str, str] = field(default_factory=dict)
    skipped_records: int = 0
    common: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        if self.config is None:
            return dict(self.common)
        return {
            "config": dict(self.config),
            "config_hash": self.config_hash,
            "method_options": {k: dict(v) for k, v in self.method_options.items()},
            "not_run": dict(self.not_run),
            "skipped_records": self.skipped_records,
            **({"hparams": {k: dict(v) for k, v in self.hparams.items()}} if self.hparams else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunInfo:
        if "config" not in data:
            return cls(common=dict(data))
        return cls(
            config=dict(data["config"]),
            config_hash=data.get("config_hash"),
            method_options=dict(data.get("method_options") or {}),
            hparams=dict(data.get("hparams") or {}),
            not_run=dict(data.get("not_run") or {}),
            skipped_records=int(data.get("skipped_records") or 0),
        )


@dataclass(frozen=True)
class GroupSummary:
    """One (model, method, protocol, gap, checkpoint) x edit type group of a summary.

    ``edit_type`` is "all" for every edit type together. A group with a ``task`` holds the cases
    of that task type only (its ``edit_type`` is "all"). The metric sections are macro means
    over the group's ok cases (rounded); ``portability_relative_change`` is (post - base) / base
    per portability hop, None where the base is 0.
    """

    model: str | None
    method: str | None
    protocol: str
    gap: int | None
    checkpoint: int | None
    edit_type: str
    n_cases: int
    n_collapsed: int
    n_error: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    exact_match: Mapping[str, float] = field(default_factory=dict)
    base: Mapping[str, float] = field(default_factory=dict)
    portability_relative_change: Mapping[str, float | None] = field(default_factory=dict)
    efficiency: Mapping[str, float] = field(default_factory=dict)
    provenance: Provenance | None = None
    #: Macro means of the free-generation match and of the judge's verdicts, the unedited
    #: model's generation match, and how many probes the judge could not grade.
    generated: Mapping[str, float] = field(default_factory=dict)
    judged: Mapping[str, float] = field(default_factory=dict)
    base_generated: Mapping[str, float] = field(default_factory=dict)
    n_judge_failed: int | None = None
    generated_vqa: Mapping[str, float] = field(default_factory=dict)
    generated_f1: Mapping[str, float] = field(default_factory=dict)
    task: str | None = None

    ADDED_LATER = (
        "provenance",
        "generated",
        "judged",
        "base_generated",
        "n_judge_failed",
        "generated_vqa",
        "generated_f1",
        "task",
    )

    @property
    def comparable_group(self) -> str:
        """The group key of the definitions behind these numbers ("unrecorded" for older runs)."""
        return self.provenance.comparable_group if self.provenance is not None else "unrecorded"

    def section(self, name: str) -> Mapping[str, Any]:
        """A metric section by name ("metrics", "exact_match", "base", "efficiency" …)."""
        value = getattr(self, name)
        if not isinstance(value, Mapping):
            raise KeyError(name)
        return value

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        _put_provenance(out, self.provenance)
        _drop_unset(out, self.ADDED_LATER)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GroupSummary:
        values = _known(cls, data, "summary group")
        values["provenance"] = _provenance(values.get("provenance"), "summary group")
        values.setdefault("protocol", "single")
        values.setdefault("gap", None)
        values.setdefault("checkpoint", None)
        values.setdefault("edit_type", "all")
        for name in ("n_cases", "n_collapsed", "n_error"):
            values.setdefault(name, 0)
        values.setdefault("model", None)
        values.setdefault("method", None)
        return cls(**values)


@dataclass(frozen=True)
class RunSummary:
    """A run's summary: its ``RunInfo`` and one ``GroupSummary`` per group, in a fixed order."""

    run: RunInfo
    groups: tuple[GroupSummary, ...]
    schema: str = SUMMARY_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SUMMARY_SCHEMA,
            "run": self.run.to_dict(),
            "groups": [g.to_dict() for g in self.groups],
        }

    def to_json(self) -> str:
        """The ``summary.json`` text: indented, sorted keys."""
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True, indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "summary") -> RunSummary:
        if not isinstance(data, Mapping):
            raise BadRecordError(f"{where}: a summary is a JSON object")
        _check_schema(data, SUMMARY_SCHEMAS, where)
        try:
            groups = tuple(GroupSummary.from_dict(g) for g in data.get("groups") or ())
        except (TypeError, AttributeError) as e:
            raise BadRecordError(f"{where}: {e}") from None
        return cls(RunInfo.from_dict(data.get("run") or {}), groups)

    @classmethod
    def from_json(cls, text: str, where: str = "summary") -> RunSummary:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadRecordError(f"{where}: not JSON ({e.msg})") from None
        return cls.from_dict(data, where)
