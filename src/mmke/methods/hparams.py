"""The anchors' hparams files (EasyEdit, VLKEB, MMKE-Bench YAML) read as mmke method options.

``method_options.<method>.hparams=PATH`` names such a file; ``read_hparams`` translates it for the
method, key by key, through that method's table below: a key either sets an mmke option
(converted), or is ignored with the reason why, or is refused with a one-line ``ConfigError``
naming the file and the key. A key no table knows is refused too: a typo or a setting from a newer
anchor must not vanish silently. Module paths (``model.layers.31.mlp.down_proj.weight``,
``opt_model.model.decoder.layers.31.fc1.weight``, ``language_model.model.layers[18]…``) are read
as a role and a layer index (``read_site``), since mmke's methods pick edit sites by role.

Layer indices stay as the file gives them (layer 31 is layer 31, not "the last"); whether the
model has them is checked once it is loaded (``Hparams.check_layers``), unless the user set that
option explicitly. Options the user sets next to ``hparams`` override the file's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmke.errors import ConfigError
from mmke.models.layout import Layout

#: The option that names a file (consumed before the method's config sees the options).
KEY = "hparams"

# --- module paths ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """A module path read by role: ``area`` (llm, vision, projector, qformer), ``part`` inside a
    decoder layer (mlp, mlp_in, mlp_out, attention; None for the whole layer or area) and ``layer``."""

    area: str
    part: str | None = None
    layer: int | None = None


_AREAS = (  # first match wins: a Q-Former or projector path may also contain "layer"/"vision"
    ("qformer", re.compile(r"(^|\.)qformer(\.|$)", re.I)),
    (
        "projector",
        re.compile(r"(^|\.)(mm_projector|multi_modal_projector|language_projection|llama_proj)(\.|$)"),
    ),
    ("vision", re.compile(r"(^|\.)(vision_model|vision_tower|visual_encoder|visual)(\.|$)")),
)
_LAYER = re.compile(r"\.(?:layers|layer|h|blocks|resblocks)\.(\d+|\{\}|\*)(?=\.|$)")
_MLP_OUT = re.compile(r"(^|\.)(mlp\.(down_proj|c_proj|w2|fc_out|dense_4h_to_h)|fc2)(\.|$)")
_MLP_IN = re.compile(r"(^|\.)(mlp\.(up_proj|gate_proj|w1|c_fc|fc_in|dense_h_to_4h)|fc1)(\.|$)")
_ATTENTION = re.compile(r"(^|\.)(self_attn|attn|attention|[qkvo]_proj|c_attn)(\.|$)")


def read_site(path: str) -> Site:
    """The role of an anchor's module or parameter path; ``layer`` is -1 where the path has ``{}``
    or ``*`` in place of an index (templates and patterns; the caller supplies the layers)."""
    norm = re.sub(r"\[(\d+)\]", r".\1", path.strip())  # EasyEdit writes layers[18]
    norm = re.sub(r"\.\*(?=\w)", ".*.", norm).removesuffix(".*")  # LoRA patterns: layers.*q_proj.*
    area = next((name for name, pattern in _AREAS if pattern.search(norm)), "llm")
    found = _LAYER.search(f".{norm}") or _LAYER.search(f".{norm}.")
    layer = None if found is None else int(found.group(1)) if found.group(1).isdigit() else -1
    rest = f".{norm}"[found.end() :] if found else f".{norm}"
    part = (
        "mlp_out"
        if _MLP_OUT.search(rest)
        else "mlp_in"
        if _MLP_IN.search(rest)
        else "attention"
        if _ATTENTION.search(rest)
        else "mlp"
        if re.search(r"(^|\.)mlp(\.|$)", rest)
        else None
    )
    return Site(area, part, layer)


# --- the result -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerRef:
    """A layer index an option took from the file, checked against the model once it is loaded."""

    key: str
    option: str
    area: str  # llm or vision
    index: int


@dataclass(frozen=True)
class Hparams:
    """One anchor file translated for one method.

    ``options``: mmke option -> value; ``ignored``: anchor key -> why mmke does not use it;
    ``notes``: anchor key -> how mmke's mapped behaviour differs from the anchors'.
    """

    path: str
    method: str
    options: Mapping[str, Any]
    ignored: Mapping[str, str]
    notes: Mapping[str, str] = field(default_factory=dict)
    layer_refs: tuple[LayerRef, ...] = ()

    def check_layers(self, layout: Layout, user_options: Collection[str] = ()) -> None:
        """Refuse a layer index the model does not have (options the user set are theirs to check)."""
        for ref in self.layer_refs:
            if ref.option in user_options:
                continue
            n = layout.n_layers if ref.area == "llm" else len(layout.vision_layers())
            if not -n <= ref.index < n:
                raise ConfigError(
                    f"{self.path}: {ref.key} names {ref.area} layer {ref.index}, but the model has {n} "
                    f"(0-{n - 1}); set method_options.{self.method}.{ref.option} to choose others"
                )

    def record(self) -> dict[str, Any]:
        """What a run keeps of the translation (next to the resolved options)."""
        return {"file": self.path, "ignored": dict(self.ignored), "notes": dict(self.notes)}

    def describe(self) -> str:
        """One log line: the file, what it set and what it left out."""
        ignored = "; ".join(f"{k} ({why})" for k, why in self.ignored.items())
        return f"{self.method}: {self.path} sets {dict(self.options)}; ignored: {ignored or 'nothing'}"


# --- reading --------------------------------------------------------------------------------


class _Reading:
    """The translation of one file in progress (what the rules write to)."""

    def __init__(self, path: str, method: str, data: Mapping[str, Any]) -> None:
        self.path, self.method, self.data = path, method, data
        self.options: dict[str, Any] = {}
        self.ignored: dict[str, str] = {}
        self.notes: dict[str, str] = {}
        self.refs: list[LayerRef] = []

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {message}")

    def layers(self, key: str, option: str, area: str, indices: Collection[int]) -> tuple[int, ...]:
        picked = tuple(sorted(set(indices)))
        self.refs += [LayerRef(key, option, area, i) for i in picked]
        return picked


#: A rule translates one key: (reading, key, value) -> nothing; it sets options, ignores or raises.
Rule = Callable[[_Reading, str, Any], None]


def to(option: str, kind: Callable[[Any], Any] = float, note: str = "") -> Rule:
    """The key sets ``option`` (converted by ``kind``; YAML reads 1e-4 as a string)."""

    def rule(r: _Reading, key: str, value: Any) -> None:
        try:
            r.options[option] = kind(value)
        except (TypeError, ValueError):
            raise r.error(key, f"{value!r} is not a valid {option}") from None
        if note:
            r.notes[key] = note

    return rule


def integer(value: Any) -> int:
    if isinstance(value, bool) or float(value) != int(float(value)):
        raise ValueError("not an integer")
    return int(float(value))


def ignore(why: str) -> Rule:
    def rule(r: _Reading, key: str, value: Any) -> None:
        r.ignored[key] = why

    return rule


def fixed(expected: Any, why: str) -> Rule:
    """Ignored while the file has what mmke always does; any other value cannot be honoured."""

    def rule(r: _Reading, key: str, value: Any) -> None:
        if _same(value, expected):
            r.ignored[key] = why
        else:
            raise r.error(key, f"{value!r} cannot be mapped: {why}")

    return rule


def _same(value: Any, expected: Any) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("none", "null"):
        value = None  # EasyEdit writes val_reg: None
    if isinstance(expected, str) and isinstance(value, str):
        return value.lower() == expected.lower()
    if isinstance(expected, bool) or expected is None:
        return value is expected
    try:
        return float(value) == float(expected)
    except (TypeError, ValueError):
        return False


def _paths(r: _Reading, key: str, value: Any) -> list[str]:
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise r.error(key, f"expected a list of module paths, got {value!r}")
    return paths


def _sites(r: _Reading, key: str, value: Any) -> list[Site]:
    return [read_site(p) for p in _paths(r, key, value)]


def _decoder_layers(r: _Reading, key: str, sites: list[Site], what: str) -> list[int]:
    """The layer indices of decoder-layer MLP sites (anything else cannot be mapped for ``what``)."""
    out = []
    for site in sites:
        if site.area != "llm" or site.part not in ("mlp", "mlp_in", "mlp_out") or site.layer is None:
            raise r.error(key, f"{what} edits language-model MLPs; this names {_show(site)}")
        if site.layer < 0:
            raise r.error(key, f"{what} needs explicit layer indices, not a template")
        out.append(site.layer)
    return out


def _show(site: Site) -> str:
    where = f" layer {site.layer}" if site.layer is not None and site.layer >= 0 else ""
    return f"the {site.area}{where}{f' {site.part}' if site.part else ''}"


def _mlp_note(paths: list[str], verb: str = "edits") -> str:
    names = {p.removesuffix(".weight").removesuffix(".bias").rsplit(".", 1)[-1] for p in paths}
    return f"mmke {verb} every Linear in these layers' MLPs (the file lists {', '.join(sorted(names))})"


# --- shared tables ----------------------------------------------------------------------------

_PATH = "a path on the authors' machine"
_MODEL = "names the authors' model; mmke edits the run's model="

ENVIRONMENT: dict[str, Rule] = {
    "device": ignore("the authors' GPU; mmke runs on the run's device="),
    "model_parallel": ignore("multi-GPU switch; mmke runs on the run's device="),
    **{k: ignore(_MODEL) for k in ("name", "model_name", "model_class", "tokenizer_class", "tokenizer_name")},
    **{
        k: ignore(f"{_PATH} (LAVIS weights); mmke edits the run's model=")
        for k in ("qformer_checkpoint", "qformer_name_or_path", "state_dict_file", "pretrained_ckpt")
    },
    "coco_image": ignore(f"{_PATH}; images come from the benchmark and image_root="),
    "rephrase_image": ignore(f"{_PATH}; images come from the benchmark and image_root="),
    "results_dir": ignore(f"{_PATH}; mmke writes under the run's out="),
    "half": ignore("precision is the run's dtype="),
    "dtype": ignore("precision is the run's dtype="),
    "exact_match": ignore("EasyEdit's scoring switch; mmke scores with the run's scoring="),
    "use_chat_template": ignore("mmke's model family decides the prompt format"),
    "file_type": ignore("EasyEdit's image/video switch; mmke reads what the benchmark gives"),
    "hidden_act": ignore("a property of the model; mmke reads the model itself"),
    "freeze_qformer": ignore("mmke never trains the edited model's own weights while training an editor"),
}

_LOGS = "a logging or saving switch of the anchors' trainer"
_VALIDATION = "validation and early stopping of the anchors' trainer; mmke trains for train_steps steps"


def _schedule(r: _Reading, key: str, value: Any) -> None:
    """max_iters counts batches of batch_size cases, one optimiser step per accumulate_bs of them;
    mmke's train_steps counts optimiser steps of train_batch cases."""
    try:
        iters = integer(r.data.get("max_iters", 0) or 0)
        per_batch = integer(r.data.get("batch_size", 1) or 1)
        accumulate = integer(r.data.get("accumulate_bs", 1) or 1)
    except (TypeError, ValueError):
        raise r.error(key, f"{value!r} is not an integer") from None
    if min(per_batch, accumulate) < 1:
        raise r.error(key, "batch_size and accumulate_bs must be >= 1")
    if iters:
        r.options["train_steps"] = max(iters // accumulate, 1)
    r.options["train_batch"] = per_batch * accumulate


TRAINER: dict[str, Rule] = {
    "max_iters": _schedule,
    "batch_size": _schedule,
    "accumulate_bs": _schedule,
    "lr": to("train_lr"),
    "grad_clip": to("grad_clip"),
    "seed": to("train_seed", integer),
    "opt": fixed("Adam", "mmke trains editors with Adam"),
    "model_save_pt": ignore(
        "how often the anchors saved the editor; mmke's checkpoint_every= is for resuming"
    ),
    **{k: ignore(_VALIDATION) for k in ("val_batch_size", "val_interval", "val_steps")},
    **{k: ignore(_VALIDATION) for k in ("early_stop_patience", "early_stop_key")},
    "eval_only": ignore(
        "the anchors' train-or-evaluate switch; mmke trains when it has no editor, then evaluates"
    ),
    "final_eval": ignore(
        "the anchors' train-or-evaluate switch; mmke trains when it has no editor, then evaluates"
    ),
    **{k: ignore(_LOGS) for k in ("silent", "verbose", "debug", "save", "log_interval", "eval_log_interval")},
    "log_errors": ignore(_LOGS),
    "archive": ignore(
        "a trained editor on the authors' machine; mmke trains its own (editor_path= loads one)"
    ),
    "train_base": fixed(False, "mmke never trains the base model"),
    "no_grad_layers": fixed(None, "mmke freezes no extra layers"),
    "dropout": fixed(0.0, "mmke's editors use no dropout"),
    "cbase": ignore("the anchors' base-model loss is never computed (l_base = 0)"),
}

#: MEND's gradient-transform settings, which mmke's MEND has built in (mmke.methods.mend).
_MEND_NET = "mmke's MEND transform is built in (see mmke.methods.mend)"
MEND_NET: dict[str, Rule] = {
    "n_hidden": fixed(1, _MEND_NET),
    "hidden_dim": fixed(None, _MEND_NET),
    "init": fixed("id", _MEND_NET),
    "norm": fixed(True, _MEND_NET),
    "combine": fixed(True, _MEND_NET),
    "x_only": fixed(False, _MEND_NET),
    "delta_only": fixed(False, _MEND_NET),
    "one_sided": fixed(False, _MEND_NET),
    "act": fixed("relu", _MEND_NET),
    "mlp_class": fixed("IDMLP", _MEND_NET),
    "lr_scale": fixed(1.0, "mmke applies the learned step sizes unscaled"),
}

#: Keys of the anchors' MEND training file; their FT and KE files are copies of it.
_MEND_FILE_KEYS = (
    *TRAINER,
    *MEND_NET,
    *("lr_lr", "edit_lr", "rank", "shared", "cedit", "iedit", "cloc", "inner_params"),
)


# --- per method -------------------------------------------------------------------------------

#: The FT sites each FT method may be given (ft_projector is FT-Alignment: BLIP-2's is its Q-Former).
FT_SITES = {
    "ft": ("llm", "projector", "qformer", "vision"),
    "ft_llm": ("llm",),
    "ft_projector": ("projector", "qformer"),
    "ft_vision": ("vision",),
}


def _ft_params(r: _Reading, key: str, value: Any) -> None:
    """VLKEB's FT: a list of parameter names, or one module name matched as a substring."""
    paths = _paths(r, key, value)
    sites = [read_site(p) for p in paths]
    layers: tuple[int, ...] | None = None
    if len(sites) == 1 and sites[0].layer is None:  # "Qformer", "mm_projector", "vision_model"
        site = sites[0].area
        if site not in ("projector", "qformer"):
            raise r.error(
                key,
                f"{paths[0]!r} (the whole {site} side) cannot be mapped: mmke's FT edits chosen "
                "vision layers (site=vision, layers=[...]), the projector or the Q-Former",
            )
    else:
        areas = {s.area for s in sites}
        if len(areas) != 1 or not areas <= {"llm", "vision"} or any(s.layer is None for s in sites):
            shown = ", ".join(sorted({_show(s) for s in sites}))
            raise r.error(
                key,
                "mmke's FT edits language-model MLP layers, vision layers, the projector or the "
                f"Q-Former; this list names {shown}",
            )
        site = areas.pop()
        if site == "llm":
            _decoder_layers(r, key, sites, "mmke's FT on the llm site")
            r.notes[key] = _mlp_note(paths, "trains")
        layers = r.layers(key, "layers", site, [s.layer for s in sites if s.layer is not None])
    if site not in FT_SITES[r.method]:
        raise r.error(
            key,
            f"names the {site} site, which {r.method} does not edit; "
            f"use method_options.{_ft_for(site)}.hparams",
        )
    r.options["site"] = site
    if layers is not None:
        r.options["layers"] = layers


def _ft_for(site: str) -> str:
    return next(m for m, sites in FT_SITES.items() if m != "ft" and site in sites)


_FT_UNUSED = "a MEND setting left in the anchors' FT template; their FT never reads it"
FT: dict[str, Rule] = {
    **{k: ignore(_FT_UNUSED) for k in _MEND_FILE_KEYS},
    "inner_params": _ft_params,
    "num_steps": to("steps", integer),
    "edit_lr": to("lr"),
    "weight_decay": to(
        "weight_decay",
        lambda _: 0.01,
        note="the anchors never pass it to AdamW, so PyTorch's default 0.01 applies (mmke uses 0.01)",
    ),
}


IKE: dict[str, Rule] = {
    "k": to("k", integer),
    "sentence_model_name": ignore(f"{_PATH}; mmke's IKE embeds with its own all-MiniLM-L6-v2"),
    "task_name": ignore("names the anchors' embedding cache file; mmke keys its cache itself"),
}


def _hyper_layers(what: str) -> Rule:
    def rule(r: _Reading, key: str, value: Any) -> None:
        paths = _paths(r, key, value)
        layers = _decoder_layers(r, key, [read_site(p) for p in paths], what)
        r.options["layers"] = r.layers(key, "layers", "llm", layers)
        r.notes[key] = _mlp_note(paths)

    return rule


def _edit_weights(r: _Reading, key: str, value: Any) -> None:
    """MEND's loss weights NLL(edit) by cedit and NLL(image rephrase) by iedit; mmke has one c_edit."""
    cedit, iedit = r.data.get("cedit", 1.0), r.data.get("iedit", r.data.get("cedit", 1.0))
    if not _same(cedit, iedit):
        raise r.error(
            key, f"cedit {cedit} and iedit {iedit} differ; mmke's MEND weights every edit NLL by one c_edit"
        )
    to("c_edit")(r, key, value)


MEND: dict[str, Rule] = {
    **TRAINER,
    **MEND_NET,
    "inner_params": _hyper_layers("MEND"),
    "edit_lr": to("edit_lr"),
    "lr_lr": ignore("mmke learns the step sizes in log space at train_lr (see mmke.methods.mend)"),
    "rank": to("rank", integer),
    "shared": to("shared", lambda v: v if isinstance(v, bool) else _bad_bool(v)),
    "cedit": _edit_weights,
    "iedit": ignore("weighted with cedit: mmke's c_edit weights every edit NLL"),
    "cloc": to("c_loc"),
}


def _bad_bool(value: Any) -> bool:
    raise ValueError(f"{value!r} is not true or false")


_KE_UNUSED = (
    "the anchors' KE (KE/ke_train.py) reads only inner_params from this MEND copy; its settings are its own"
)
KE: dict[str, Rule] = {
    **{k: ignore(_KE_UNUSED) for k in _MEND_FILE_KEYS},
    "inner_params": _hyper_layers("KE"),
}


_SERAC_OWN = "a setting of the anchors' scope classifier / counterfactual model; mmke's SERAC has its own"
SERAC: dict[str, Rule] = {
    **TRAINER,
    "cedit": to("cedit"),
    "iedit": to("iedit"),
    "cloc": to("cloc"),
    "inner_params": ignore(
        "read only by SERAC_MULTI's self-test; mmke's counterfactual model is the last cf_layers layers"
    ),
    "small_name": ignore(
        f"{_PATH} (the counterfactual model); mmke's is the base model's last cf_layers layers"
    ),
    "cls_name": ignore(
        f"{_PATH} (distilbert); mmke's classifier embeds text with MiniLM, images with the model"
    ),
    "cls_class": ignore(
        "the anchors' classifier class; mmke's classifier is its own (see mmke.methods.serac)"
    ),
    "supervised": ignore(
        "the anchors' soft mixing switch; mmke routes hard at threshold= (see mmke.methods.serac)"
    ),
    "edit_lr": ignore("SERAC learns no edit step size"),
    "lr_lr": ignore("SERAC learns no edit step size"),
    **{
        k: ignore(_SERAC_OWN)
        for k in (
            "soft_weighting",
            "checkpoint_grad",
            "cross_attend",
            "cos",
            "freeze",
            "square",
            "bound_embeds",
            "use_all_negatives",
            "freeze_cntr",
            "dist_heads",
            "lora",
            "unlikelihood",
            "edit_bs",
        )
    },
}


def _lora_site(r: _Reading, key: str, value: Any) -> None:
    """EasyEdit's LoRA: target_modules (names or patterns) on layers (empty: every layer)."""
    targets = r.data.get("target_modules") or []
    layers = r.data.get("layers", [])
    sites = _sites(r, "target_modules", targets)
    parts = {"attention" if s.part == "attention" else "llm" if s.part else None for s in sites}
    if None in parts or len(parts) != 1 or any(s.area != "llm" for s in sites):
        raise r.error(
            "target_modules",
            f"{targets!r}: mmke's LoRA adapts either the attention or the MLP "
            "Linears of language-model layers, not a mix or other modules",
        )
    r.options["site"] = parts.pop()
    r.notes["target_modules"] = (
        f"mmke adapts every Linear of the {r.options['site']} blocks (the file lists {targets})"
    )
    named = [s.layer for s in sites if s.layer is not None and s.layer >= 0]
    if not isinstance(layers, list) or not all(isinstance(i, int) for i in layers):
        raise r.error("layers", f"expected a list of layer indices, got {layers!r}")
    if layers or named:
        r.options["layers"] = r.layers(
            "layers" if layers else "target_modules", "layers", "llm", layers or named
        )
    elif "layers" not in r.options:
        r.options["layers"] = None  # every layer: refused unless the user names layers (see read_hparams)


def _lora_type(r: _Reading, key: str, value: Any) -> None:
    if str(value).lower() not in ("lora", "adalora"):
        raise r.error(key, f"{value!r} cannot be mapped: mmke's LoRA is plain LoRA")
    if str(value).lower() == "adalora":
        r.notes[key] = "mmke runs plain LoRA: AdaLoRA's rank reallocation is not done"
    else:
        r.ignored[key] = "mmke's LoRA is plain LoRA"


LORA: dict[str, Rule] = {
    "lora_type": _lora_type,
    "target_modules": _lora_site,
    "layers": _lora_site,
    "rank": to("rank", integer),
    "lora_alpha": to("alpha"),
    "lora_dropout": to("dropout"),
    "num_steps": to("steps", integer),
    "lr": to("lr"),
    "weight_decay": to("weight_decay"),
    "kl_factor": fixed(0, "mmke's LoRA has no KL term"),
    "norm_constraint": fixed(False, "mmke's LoRA has no norm constraint"),
    "batch_size": ignore("mmke edits one case at a time"),
    "max_length": ignore("a truncation length; mmke encodes whole prompts"),
    "sh_lr": ignore("EasyEdit's multimodal LoRA decays lr by this factor per step; mmke's keeps lr constant"),
}


def _one_layer(method: str) -> Rule:
    """GRACE / WISE: one parameter path; mmke wraps its layer's MLP output projection."""

    def rule(r: _Reading, key: str, value: Any) -> None:
        paths = _paths(r, key, value)
        if len(paths) != 1:
            raise r.error(key, f"{method} wraps one layer; this names {len(paths)} parameters")
        site = read_site(paths[0])
        (layer,) = _decoder_layers(r, key, [site], method)
        r.options["layer"] = r.layers(key, "layer", "llm", [layer])[0]
        if site.part != "mlp_out":
            r.notes[key] = f"mmke's {method} wraps the MLP output projection of layer {layer}, not {paths[0]}"

    return rule


_GRACE_OWN = "GRACE's codebook rules as mmke implements them (see mmke.methods.grace)"
GRACE: dict[str, Rule] = {
    "inner_params": _one_layer("GRACE"),
    "edit_lr": to("lr"),
    "n_iter": to("steps", integer),
    "eps": to("eps"),
    "dist_fn": fixed("euc", "mmke's GRACE measures Euclidean distance"),
    "val_init": fixed("cold", "mmke's GRACE starts a value at the layer's output"),
    "val_train": fixed("sgd", "mmke's GRACE trains values by gradient steps (Adam at lr, as EasyEdit)"),
    "val_reg": fixed(None, "mmke's GRACE has no value regulariser"),
    "reg": ignore("EasyEdit's training stop rule; mmke trains steps steps"),
    "replacement": ignore(f"{_GRACE_OWN}: every token within an entry's radius is replaced"),
    "eps_expand": fixed("coverage", "mmke's GRACE expands a radius to cover a same-label key"),
    "num_pert": ignore("read only with val_train: pert"),
    "dropout": fixed(0.0, "mmke's GRACE uses no dropout"),
}


def _act_margin(r: _Reading, key: str, value: Any) -> None:
    if not isinstance(value, list) or len(value) != 3:
        raise r.error(key, f"expected [alpha, beta, gamma], got {value!r}")
    for option, v in zip(("alpha", "beta", "gamma"), value, strict=True):
        to(option)(r, key, v)


_WISE_ONE = "WISE-Merge / WISE-Retrieve: mmke's WISE keeps one side memory (see mmke.methods.wise)"
WISE: dict[str, Rule] = {
    "inner_params": _one_layer("WISE"),
    "edit_lr": to("lr"),
    "n_iter": to("steps", integer),
    "mask_ratio": to("mask_ratio"),
    "norm_constraint": to("norm_constraint", lambda v: None if v is None else float(v)),
    "act_margin": _act_margin,
    "act_ratio": to("act_ratio"),
    "objective_optimization": fixed("only_label", "mmke's WISE trains on the target tokens' NLL"),
    **{k: ignore(_WISE_ONE) for k in ("save_freq", "merge_freq", "merge_alg", "densities", "weights")},
    "retrieve": ignore(_WISE_ONE),
    "replay": ignore("WISE's replay of past edits is not implemented"),
    "sequential_edit": ignore("the editing schedule is the run's protocol="),
}


def _rewrite_module(r: _Reading, key: str, value: Any) -> None:
    site = read_site(str(value))
    if site.area != "llm" or site.part != "mlp_out":
        raise r.error(
            key, f"{value!r} cannot be mapped: mmke's {r.method.upper()} rewrites MLP output projections"
        )
    r.ignored[key] = "the MLP output projection, which mmke finds by role (mmke.models.layout)"


def _key_layers(single: bool) -> Rule:
    def rule(r: _Reading, key: str, value: Any) -> None:
        if not isinstance(value, list) or not value or not all(isinstance(i, int) for i in value):
            raise r.error(key, f"expected a list of layer indices, got {value!r}")
        if single and len(value) != 1:
            raise r.error(key, f"ROME edits one layer, got {value}; use memit for several")
        picked = r.layers(key, "layer" if single else "layers", "llm", value)
        r.options["layer" if single else "layers"] = picked[0] if single else picked

    return rule


def _fact_token(r: _Reading, key: str, value: Any) -> None:
    keys = {"subject_last": "subject", "last": "prompt_end"}
    if value not in keys:
        raise r.error(key, f"{value!r} cannot be mapped: mmke reads the key at {' or '.join(keys)}")
    r.options["key"] = keys[value]


def _rome_mom2(r: _Reading, key: str, value: Any) -> None:
    if value is False:  # ROME without C⁻¹: mmke's cov_lambda -> 0 is exactly that
        r.options["cov_lambda"] = 1e-6
        r.notes[key] = "false: cov_lambda=1e-6, mmke's covariance-free rank-one update (u ∝ k*)"
    else:
        r.ignored[key] = "true: mmke's ROME weights the key statistics by cov_lambda"


_MODULES = "a module name mmke finds by role (mmke.models.layout)"
_STATS = "mmke computes key statistics from stats_texts= or the train split"
KEY_VALUE: dict[str, Rule] = {
    "rewrite_module_tmp": _rewrite_module,
    **{k: ignore(_MODULES) for k in ("layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module")},
    "lm_head_module": ignore(_MODULES),
    "fact_token": _fact_token,
    "v_num_grad_steps": to("v_steps", integer),
    "v_lr": to("v_lr"),
    "v_weight_decay": to("v_weight_decay"),
    "clamp_norm_factor": to("clamp_norm_factor"),
    "v_loss_layer": ignore("mmke reads the v* loss at the model's output (the anchors' last layer)"),
    "kl_factor": ignore("mmke's v* loss has no KL (essence) term"),
    "context_template_length_params": ignore(
        "mmke optimises v* on the edit prompt alone, without random prefixes"
    ),
    **{k: ignore(_STATS) for k in ("mom2_dataset", "mom2_n_samples", "mom2_dtype")},
    "stats_dir": ignore(f"{_PATH}; mmke caches key statistics itself"),
}

ROME: dict[str, Rule] = {**KEY_VALUE, "layers": _key_layers(single=True), "mom2_adjustment": _rome_mom2}
MEMIT: dict[str, Rule] = {
    **KEY_VALUE,
    "layers": _key_layers(single=False),
    "layer_selection": fixed("all", "mmke's MEMIT edits every layer in layers"),
    "mom2_adjustment": fixed(True, "mmke's MEMIT always weights the key statistics (cov_lambda)"),
    "mom2_update_weight": to("cov_lambda"),
}

#: Method -> (the anchor algorithm names its files may carry, its table).
TABLES: dict[str, tuple[tuple[str, ...], dict[str, Rule]]] = {
    **{m: (("FT",), FT) for m in FT_SITES},
    "ike": (("IKE",), IKE),
    "serac": (("SERAC", "SERAC_MULTI"), SERAC),
    "mend": (("MEND",), MEND),
    "ke": (("KE", "MEND"), KE),  # the anchors' KE files are copies of their MEND files (alg: MEND)
    "lora": (("LoRA",), LORA),
    "grace": (("GRACE",), GRACE),
    "wise": (("WISE",), WISE),
    "rome": (("ROME",), ROME),
    "memit": (("MEMIT",), MEMIT),
}


def _check_alg(r: _Reading, algs: tuple[str, ...]) -> None:
    for key in ("alg_name", "alg"):
        if key in r.data:
            name = str(r.data[key])
            if name.upper() not in {a.upper() for a in algs}:
                raise r.error(key, f"{name!r} is not {r.method} (a {r.method} file says {' or '.join(algs)})")
            r.ignored[key] = f"names the method ({name}); checked against {r.method}"


def read_hparams(path: str | Path, method: str, user_options: Collection[str] = ()) -> Hparams:
    """Translate the anchor file at ``path`` for ``method``; every key is mapped, ignored or refused.

    ``user_options`` are the options the user sets beside the file: a key that cannot be mapped
    only on its own (LoRA's "every layer") is fine when the user sets what it would have set.
    """
    from mmke.config import read_yaml

    if method not in TABLES:
        raise ConfigError(
            f"{method}: no hparams mapping for this method (mapped: {', '.join(sorted(TABLES))})"
        )
    data = read_yaml(Path(path))
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of hyperparameters, got {type(data).__name__}")
    algs, table = TABLES[method]
    r = _Reading(str(path), method, data)
    _check_alg(r, algs)
    for key, value in data.items():
        if key in ("alg_name", "alg"):  # checked above
            continue
        rule = table.get(key) or ENVIRONMENT.get(key)
        if rule is None:
            raise r.error(
                str(key), f"unknown {method} hparams key (not an EasyEdit/VLKEB/MMKE-Bench key mmke maps)"
            )
        rule(r, str(key), value)
    if r.options.get("layers", ()) is None:
        if "layers" not in user_options:
            raise r.error(
                "layers",
                "[] means every layer; mmke's LoRA takes explicit indices: "
                f"set method_options.{method}.layers",
            )
        del r.options["layers"]
    return Hparams(str(path), method, r.options, r.ignored, r.notes, tuple(r.refs))


def expand(method: str, options: Mapping[str, Any]) -> tuple[dict[str, Any], Hparams | None]:
    """``options`` with their ``hparams`` file (if any) read in under them: the user's keys win."""
    if KEY not in options:
        return dict(options), None
    user = {k: v for k, v in options.items() if k != KEY}
    path = options[KEY]
    if not isinstance(path, str | Path) or not str(path):
        raise ConfigError(f"method_options.{method}.{KEY} must be a file path, got {path!r}")
    hp = read_hparams(path, method, user)
    return {**hp.options, **user}, hp
