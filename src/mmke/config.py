"""Run configuration: a frozen ``RunConfig`` resolved as defaults <- YAML file <- ``key=value`` overrides.

Unknown keys and ill-typed values are ``ConfigError``s of one line that say how to fix them;
``to_dict`` is what a run saves, and loading it back gives an equal config.
"""

from __future__ import annotations

import copy
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from mmke.errors import ConfigError
from mmke.registry import protocols, scorers
from mmke.types import EditType

DTYPES = ("float32", "float16", "bfloat16")
EVALUATIONS = ("teacher_forced", "generation", "judge")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class RunConfig:
    """Everything ``mmke run`` needs; saved with every run as ``config.yaml``."""

    benchmark: str = field(
        default="world", metadata=_help("benchmark: name[:file], e.g. vlkeb:eval_multihop.json (`mmke list`)")
    )
    benchmark_options: dict[str, Any] = field(
        default_factory=dict,
        hash=False,
        metadata=_help("the benchmark reader's settings, e.g. benchmark_options.hop=2"),
    )
    model: str = field(default="world", metadata=_help("model: 'world', a family name or a model dir"))
    methods: tuple[str, ...] = field(
        default=(
            "ft_llm",
            "ft_projector",
            "ft_vision",
            "ike",
            "serac",
            "mend",
            "ke",
            "lora",
            "grace",
            "wise",
            "rome",
            "memit",
            "alphaedit",
            "ultraedit",
        ),
        metadata=_help("editing methods to run"),
    )
    method_options: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        hash=False,
        metadata=_help("per-method settings, e.g. method_options.ft_llm.steps=20"),
    )
    protocol: str = field(
        default="single",
        metadata=_help("single, sequential, lifelong, edit_onehop or batch (mmke list protocols)"),
    )
    gaps: tuple[int, ...] = field(default=(10, 20, 50, 100), metadata=_help("sequential: edit-to-score gaps"))
    checkpoints: tuple[int, ...] = field(default=(10, 100), metadata=_help("lifelong: scoring checkpoints"))
    batch_edits: int = field(default=8, metadata=_help("batch: edits written in one update"))
    limit: int | None = field(default=None, metadata=_help("at most this many cases"))
    edit_types: tuple[str, ...] | None = field(default=None, metadata=_help("only these edit types"))
    seed: int = field(default=0, metadata=_help("random seed (case order, method init)"))
    batch_size: int = field(default=32, metadata=_help("probes per forward pass"))
    evaluation: tuple[str, ...] = field(
        default=("teacher_forced", "generation"),
        metadata=_help(
            "how probes are answered, side by side: teacher_forced (always), generation (greedy, "
            "string match), judge (a judge model grades each generation; needs judge=)"
        ),
    )
    max_new_tokens: int = field(
        default=16, metadata=_help("generation: the token budget of an answer (never the target's length)")
    )
    judge: str | None = field(
        default=None,
        metadata=_help("judge model: local:PATH (or local:smollm2) or http:URL (OpenAI-compatible)"),
    )
    judge_options: dict[str, Any] = field(
        default_factory=dict,
        hash=False,
        metadata=_help("judge settings, e.g. judge_options.model=NAME judge_options.api_key_env=VAR"),
    )
    scoring: str = field(
        default="mmke",
        metadata=_help(
            "the paper protocol results follow: mmke (canonical), vlkeb, mmke_bench or easyedit"
            " (`mmke list scorers`; README: Comparing with papers)"
        ),
    )
    emulate: tuple[str, ...] = field(
        default=(),
        metadata=_help(
            "re-enact the scoring protocol's named known bugs, e.g. emulate=[ft_stale_pre] (off by default)"
        ),
    )
    image_root: str | None = field(default=None, metadata=_help("directory image paths are relative to"))
    out: str = field(default="runs", metadata=_help("directory that holds run directories"))
    device: str = field(default="cpu", metadata=_help("torch device: cpu, cuda, cuda:1 …"))
    dtype: str = field(default="float32", metadata=_help(f"one of {', '.join(DTYPES)}"))
    skip_bad: bool = field(default=False, metadata=_help("skip malformed cases instead of stopping"))
    allow_pickle: bool = field(
        default=False,
        metadata=_help("load a model folder's pickle weights (pytorch_model.bin), which can run code"),
    )
    trust_remote_code: bool = field(
        default=False,
        metadata=_help(
            "load a model folder whose model is its own Python code (config.json auto_map, declared "
            "by its mmke_model.yaml); that code runs with your permissions"
        ),
    )

    def validate(self) -> RunConfig:
        """Check names and ranges; returns self so it chains after construction."""
        if self.protocol in scorers and self.protocol not in protocols:
            raise ConfigError(
                f"protocol={self.protocol!r}: protocol is the editing schedule "
                f"({', '.join(protocols.declared())}); for the {self.protocol} scoring variant set "
                f"scoring={self.protocol}"
            )
        _check_choice("protocol", self.protocol, protocols.declared())
        _check_choice("scoring", self.scoring, scorers.declared())
        known = scorers.get(self.scoring).emulations
        for name in self.emulate:
            if name not in known:
                offered = ", ".join(known) or "none"
                raise ConfigError(
                    f"emulate={name!r}: scoring={self.scoring} offers these emulations: {offered}"
                    f"{_did_you_mean(name, list(known))}"
                )
            if known[name].protocols and self.protocol not in known[name].protocols:
                raise ConfigError(
                    f"emulate={name!r} re-enacts a bug of {', '.join(known[name].protocols)} editing, "
                    f"not of protocol={self.protocol}"
                )
        _check_choice("dtype", self.dtype, DTYPES)
        for name in self.edit_types or ():
            _check_choice("edit_types", name, tuple(e.value for e in EditType))
        for name in self.evaluation:
            _check_choice("evaluation", name, EVALUATIONS)
        if "teacher_forced" not in self.evaluation:
            raise ConfigError(
                f"evaluation={list(self.evaluation)}: teacher_forced is always part of it "
                "(the other evaluations are reported beside it)"
            )
        if "judge" in self.evaluation and "generation" not in self.evaluation:
            raise ConfigError("evaluation: judge grades generated answers; add generation to the list")
        if "judge" in self.evaluation and not self.judge:
            raise ConfigError(
                "evaluation includes judge: name one, e.g. judge=local:smollm2 or judge=http:URL"
            )
        if not self.methods:
            raise ConfigError("methods: name at least one method, e.g. methods=[ft_llm,ike]")
        for name in ("batch_size", "limit", "max_new_tokens", "batch_edits"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value}: must be at least 1")
        # gap 0 scores each case right after its own edit, never restoring (CCKEB's continual setting)
        for name, least in (("gaps", 0), ("checkpoints", 1)):
            if any(v < least for v in getattr(self, name)):
                raise ConfigError(f"{name}={list(getattr(self, name))}: every value must be at least {least}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON data (tuples as lists); ``load_config`` of it gives an equal config."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else copy.deepcopy(value)
        return out


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(
            f"{name}={value!r}: expected one of {', '.join(choices)}{_did_you_mean(value, choices)}"
        )


def _did_you_mean(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


# ---------------------------------------------------------------- typing


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(RunConfig)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is None and hasattr(tp, "__name__"):
        return tp.__name__  # plain classes print as <class 'int'>
    return str(tp).replace("typing.", "")


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check (and lightly convert) a parsed value against a field's annotation."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0])
    origin = typing.get_origin(tp)
    if origin is tuple:
        return _coerce_tuple(name, value, args[0])
    if origin is dict:
        if args[1] is Any:
            return _coerce_mapping(name, value)
        return _coerce_options(name, value)
    return _coerce_scalar(name, value, tp)


def _bad(name: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{name}={value!r}: expected {expected}, got {type(value).__name__}")


def _coerce_scalar(name: str, value: Any, tp: type) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad(name, value, "true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _bad(name, value, "an integer")
    if tp is str:
        # YAML reads `out=2024` or `model=1.5` as numbers; they are still meant as text.
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise _bad(name, value, "a string")
    raise _bad(name, value, _type_name(tp))


def _coerce_tuple(name: str, value: Any, item: type) -> tuple:
    if isinstance(value, str) and "," in value:  # methods=ft_llm,ike reads as one string
        value = [yaml.safe_load(v.strip()) for v in value.split(",") if v.strip()]
    if not isinstance(value, list | tuple):
        value = [value]  # a single name stands for a one-item list
    return tuple(_coerce_scalar(f"{name}[{i}]", v, item) for i, v in enumerate(value))


def _coerce_mapping(name: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _bad(name, value, "a mapping of settings")
    return {str(k): copy.deepcopy(v) for k, v in value.items()}


def _coerce_options(name: str, value: Any) -> dict[str, dict[str, Any]]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _bad(name, value, "a mapping of method -> settings")
    out: dict[str, dict[str, Any]] = {}
    for method, opts in value.items():
        if opts is None:
            opts = {}
        if not isinstance(opts, Mapping):
            raise _bad(f"{name}.{method}", opts, "a mapping of settings")
        out[str(method)] = copy.deepcopy(dict(opts))
    return out


# ---------------------------------------------------------------- loading


def _unknown_key(key: str, where: str) -> ConfigError:
    known = [f.name for f in fields(RunConfig)]
    return ConfigError(f"unknown config key {key!r} {where}{_did_you_mean(key, known)}")


def _legacy(key: str, value: Any) -> tuple[str, Any]:
    """A setting older runs saved, as today's: ``generate: true`` was ``evaluation`` with generation."""
    if key != "generate":
        return key, value
    if not isinstance(value, bool):
        raise ConfigError(
            f"generate={value!r}: expected true or false (today: evaluation=[teacher_forced,generation])"
        )
    return "evaluation", ["teacher_forced", "generation"] if value else ["teacher_forced"]


def _merge_mapping(values: dict[str, Any], data: Mapping[str, Any], where: str) -> None:
    known = {f.name for f in fields(RunConfig)}
    for key, value in data.items():
        key, value = _legacy(str(key), value)
        if key not in known:
            raise _unknown_key(str(key), where)
        values[key] = value


#: Config keys whose entries ``key.sub=value`` overrides reach into.
DOTTED = ("method_options", "benchmark_options", "judge_options")


def _apply_override(values: dict[str, Any], override: str) -> None:
    """Apply one ``key=value`` (value parsed as YAML); dotted keys reach into method_options."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected key=value, e.g. limit=50")
    key, value = _legacy(key, parse_value(raw, override))
    head, *path = key.split(".")
    if head not in {f.name for f in fields(RunConfig)}:
        raise _unknown_key(head, "in overrides")
    if not path:
        values[head] = value
        return
    if head not in DOTTED:
        raise ConfigError(
            f"override {key!r}: only method_options.<method>.<setting>=value, "
            "benchmark_options.<setting>=value and judge_options.<setting>=value take dotted keys"
        )
    node = values.setdefault(head, {})
    if not isinstance(node, dict):
        raise _bad(head, node, "a mapping of method -> settings")
    for part in path[:-1]:
        child = node.get(part)
        node[part] = child = child if isinstance(child, dict) else {}
        node = child
    node[path[-1]] = value


def key_values(pairs: Sequence[str], what: str, example: str) -> dict[str, Any]:
    """Settings given as ``key=value`` (values parsed as YAML, as ``mmke run``'s); ``what`` names
    them in the one-line error, ``example`` shows one."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what} {pair!r}: expected key=value, e.g. {example}")
        out[key.strip()] = parse_value(raw, pair)
    return out


def parse_value(raw: str, setting: str) -> Any:
    """A ``key=value`` setting's value parsed as YAML (safe: plain data only)."""
    shown = setting if len(setting) <= 80 else setting[:79] + "…"
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"setting {shown!r}: value is not valid YAML ({type(e).__name__})") from None
    except RecursionError:
        raise ConfigError(f"setting {shown!r}: value is nested too deeply") from None


def read_yaml(path: Path) -> Any:
    """A YAML file's plain data; any way it can be unreadable is a one-line ``ConfigError``."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML (plain data only)") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None


def _read_yaml(path: Path) -> Mapping[str, Any]:
    data = read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def load_config(
    yaml_path: Path | None = None, overrides: Sequence[str] = (), settings: Mapping[str, Any] | None = None
) -> RunConfig:
    """Defaults <- YAML file <- ``settings`` (a mapping, as the YAML file's) <- ``key=value``
    overrides, type-checked and validated."""
    values: dict[str, Any] = RunConfig().to_dict()
    if yaml_path is not None:
        _merge_mapping(values, _read_yaml(yaml_path), f"in {yaml_path}")
    if settings:
        _merge_mapping(values, settings, "in the settings given")
    for override in overrides:
        _apply_override(values, override)
    hints = _field_types()
    typed = {name: _coerce(name, value, hints[name]) for name, value in values.items()}
    return RunConfig(**typed).validate()


def _show_default(value: Any) -> str:
    """A default as a user would type it (YAML flow style: null, false, [10, 20])."""
    plain = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(plain, default_flow_style=True).strip().removesuffix("...").strip()


def describe_fields() -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) of every setting, for ``mmke run --help``."""
    hints = _field_types()
    rows = []
    for f in fields(RunConfig):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((f.name, _type_name(hints[f.name]), _show_default(default), f.metadata.get("help", "")))
    return rows
