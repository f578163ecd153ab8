"""Models whose code ships in their folder (config.json ``auto_map``, ``modeling_*.py``), e.g. Qwen-VL.

mmke cannot read where the parts of code it does not know live, nor how it wants its prompt, so
the folder declares both in ``mmke_model.yaml`` beside the weights; ``RemoteCode.declared_in``
turns that file into a family (a subclass whose class attributes are the declaration, as a
hand-written family would set them). The model takes its inputs as the generic family does:
``processor(text=, images=)`` from the folder's own processor. The folder's code runs only when
the user opts in (``trust_remote_code``; checked where config.json is read, ``_loading``).
"""

from __future__ import annotations

import difflib
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from mmke.config import read_yaml
from mmke.errors import ConfigError, ModelLoadError
from mmke.models.families._base import Family, LayoutSpec
from mmke.registry import register_family

#: The file beside a remote-code model's weights that declares what mmke cannot infer.
DECLARATION = "mmke_model.yaml"
#: Roles whose paths start at the model root, and roles whose paths start inside a decoder layer.
ROOT_ROLES = ("decoder_layers", "vision_tower", "vision_layers", "projector", "qformer")
LAYER_ROLES = ("mlp", "mlp_out", "attention")
#: How inputs reach the model; "processor": ``processor(text=, images=)``, the generic family's way.
INPUTS = ("processor",)
#: auto_map entries that build a whole model, the first present taken when auto_class is not declared.
MODEL_AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM")
_KEYS: Mapping[str, tuple[str, ...]] = {
    "": ("auto_class", "inputs", "layout", "prompt"),
    "layout": ROOT_ROLES + LAYER_ROLES,
    "prompt": ("format", "image", "image_suffix"),
}
_REQUIRED: Mapping[str, tuple[str, ...]] = {
    "": ("layout", "prompt"),
    "layout": ("decoder_layers",),
    "prompt": ("format",),
}


@dataclass(frozen=True)
class RemoteDeclaration:
    """What a folder's ``mmke_model.yaml`` says: where the parts are, how a prompt is written, and
    which of config.json's ``auto_map`` entries builds the model (``model_ref``: ``module.Class``)."""

    file: Path
    model_ref: str
    #: role -> module path, as declared (LAYER_ROLES: inside a decoder layer)
    paths: tuple[tuple[str, str], ...]
    prompt_format: str
    image: str | None = None
    image_suffix: str = ""

    @property
    def folder(self) -> Path:
        return self.file.parent

    @property
    def layout(self) -> LayoutSpec:
        """The declared paths as a ``LayoutSpec``; inside a layer, undeclared roles keep its defaults."""
        return LayoutSpec(**{role: (path,) for role, path in self.paths})

    def fail(self, key: str, problem: str) -> ModelLoadError:
        return ModelLoadError(f"{self.file}: {key}: {problem}")


@register_family("remote")
class RemoteCode(Family):
    """A model whose code ships in its folder (trust_remote_code=true), declared by its mmke_model.yaml."""

    name = "remote"
    layout_spec = LayoutSpec(decoder_layers=())
    #: None on the registered class; set on the subclass ``declared_in`` builds for one folder.
    declared: ClassVar[RemoteDeclaration | None] = None

    @classmethod
    def declared_in(cls, folder: Path, auto_map: Mapping[str, Any]) -> RemoteCode:
        """The family ``folder/mmke_model.yaml`` declares, for a model config.json's ``auto_map`` builds."""
        declared = read_declaration(folder, auto_map)
        attributes = {
            "declared": declared,
            "layout_spec": declared.layout,
            "plain_format": declared.prompt_format,
            "image_suffix": declared.image_suffix,
        }
        return type(cls.__name__, (cls,), attributes)()

    def _declaration(self) -> RemoteDeclaration:
        if self.declared is None:
            raise ModelLoadError(
                f"family {self.name} is declared by a model folder's {DECLARATION}: load the folder "
                "with trust_remote_code=true and no family="
            )
        return self.declared

    # --- loading --------------------------------------------------------------------------

    def load_processor(self, path: Path) -> Any:
        from transformers import AutoProcessor

        declared = self._declaration()
        try:  # the user opted in: the folder's processor may be its own code too
            processor = AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=True)
        # the folder's code may fail in any way; each is one line
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot load the folder's processor ({_gist(e)})") from None
        named = isinstance(getattr(processor, "image_token", None), str)
        # a processor without an image processor is refused where the family's processor is loaded
        if hasattr(processor, "image_processor") and declared.image is None and not named:
            raise declared.fail(
                "prompt.image",
                f"the folder's {type(processor).__name__} names no image_token: "
                "declare the text that stands for an image in a prompt",
            )
        return processor

    def model_class(self, config: Any) -> type[nn.Module]:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        declared = self._declaration()
        try:
            return get_class_from_dynamic_module(declared.model_ref, declared.folder, local_files_only=True)
        # importing runs the folder's code, which may fail in any way; each is one line
        except Exception as e:
            raise ModelLoadError(f"cannot import {declared.model_ref} ({_gist(e)})") from None

    def check_model(self, model: nn.Module) -> None:
        declared = self._declaration()
        paths = dict(declared.paths)
        for role in ROOT_ROLES:
            if role in paths:
                _module(model, paths[role], declared, f"layout.{role}")
        layers = list(
            _module(model, paths["decoder_layers"], declared, "layout.decoder_layers").named_children()
        )
        if not layers:
            raise declared.fail("layout.decoder_layers", f"{paths['decoder_layers']!r} holds no layers")
        first = f"{paths['decoder_layers']}.{layers[0][0]}"
        for role in LAYER_ROLES:
            if role in paths:
                _module(model, f"{first}.{paths[role]}", declared, f"layout.{role}")

    # --- prompts --------------------------------------------------------------------------

    def chat_template(self, processor: Any) -> str | None:
        return None  # the declared format is the prompt, whatever template the folder carries

    def image_placeholder(self, processor: Any) -> str:
        image = self._declaration().image
        return image if image is not None else str(processor.image_token)

    def image_token(self, processor: Any) -> str | None:
        return self.image_placeholder(processor)


def _gist(error: BaseException) -> str:
    """The first line of an error raised by the folder's code (its type when it says nothing)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _module(model: nn.Module, path: str, declared: RemoteDeclaration, key: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise declared.fail(key, f"{type(model).__name__} has no module {path!r}") from None


# --- the file -------------------------------------------------------------------------------


def read_declaration(folder: Path, auto_map: Mapping[str, Any]) -> RemoteDeclaration:
    """``folder/mmke_model.yaml`` checked against the schema and config.json's ``auto_map``; every
    problem is one ``ModelLoadError`` line naming the file and the key."""
    file = folder / DECLARATION
    if not file.is_file():
        raise ModelLoadError(
            f"{folder}: its code ships in the folder but {DECLARATION} is missing; write one beside "
            "config.json declaring its layout and prompt (README: Models whose code ships with them)"
        )
    try:
        data = read_yaml(file)
    except ConfigError as e:
        raise ModelLoadError(str(e)) from None
    top = _section(file, data, "")
    layout, prompt = _section(file, top.get("layout"), "layout"), _section(file, top.get("prompt"), "prompt")
    inputs = top.get("inputs", INPUTS[0])
    if inputs not in INPUTS:
        raise ModelLoadError(f"{file}: inputs: {inputs!r} is not one of: {', '.join(INPUTS)}")
    return RemoteDeclaration(
        file=file,
        model_ref=_model_ref(file, top.get("auto_class"), auto_map),
        paths=tuple((r, _text(file, layout, f"layout.{r}")) for r in ROOT_ROLES + LAYER_ROLES if r in layout),
        prompt_format=_prompt_format(file, prompt),
        image=_text(file, prompt, "prompt.image", allow_empty=True) if "image" in prompt else None,
        image_suffix=_text(file, prompt, "prompt.image_suffix", allow_empty=True)
        if "image_suffix" in prompt
        else "",
    )


def _section(file: Path, data: Any, key: str) -> dict[str, Any]:
    """One mapping of the file (``key`` "": the whole file), its keys checked; required ones present."""
    where = f"{file}: {key}" if key else str(file)
    if data is None:
        raise ModelLoadError(f"{where}: missing" if key else f"{file}: empty; declare layout and prompt")
    if not isinstance(data, Mapping):
        raise ModelLoadError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = _KEYS[key]
    for name in data:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})"
            raise ModelLoadError(f"{file}: unknown key {_dotted(key, str(name))!r}{hint}")
    for name in _REQUIRED.get(key, ()):
        if name not in data:
            raise ModelLoadError(f"{file}: {_dotted(key, name)}: missing (required)")
    return dict(data)


def _dotted(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


def _text(file: Path, section: dict[str, Any], key: str, allow_empty: bool = False) -> str:
    """The string at dotted ``key`` ("layout.projector") of its section; module paths and the
    format must not be empty."""
    value = section[key.rpartition(".")[2]]
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        kind = "a string" if allow_empty else "a non-empty string"
        raise ModelLoadError(f"{file}: {key}: expected {kind}, got {value!r}")
    return value


def _prompt_format(file: Path, prompt: dict[str, Any]) -> str:
    """``prompt.format``: a string whose only fields are ``{image}`` and ``{prompt}``, both present."""
    text = _text(file, prompt, "prompt.format")
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as e:
        raise ModelLoadError(f"{file}: prompt.format: {e} (write a literal brace as {{{{ or }}}})") from None
    if names != {"image", "prompt"}:
        raise ModelLoadError(
            f"{file}: prompt.format: needs the fields {{image}} and {{prompt}} and no others, "
            f"has {', '.join(sorted(repr(n) for n in names)) or 'none'}"
        )
    return text


def _model_ref(file: Path, declared: Any, auto_map: Mapping[str, Any]) -> str:
    """The ``module.Class`` config.json's ``auto_map`` builds the model with: the declared
    ``auto_class`` entry, else the first of ``MODEL_AUTO_CLASSES`` it has."""
    offered = [k for k in auto_map if k != "AutoConfig"]
    if declared is None:
        found = next((k for k in MODEL_AUTO_CLASSES if k in auto_map), None)
        if found is None:
            raise ModelLoadError(
                f"{file}: auto_class: missing, and config.json's auto_map has none of "
                f"{', '.join(MODEL_AUTO_CLASSES)} (it has: {', '.join(offered) or 'nothing'})"
            )
        declared = found
    if not isinstance(declared, str) or declared not in offered or not isinstance(auto_map[declared], str):
        raise ModelLoadError(
            f"{file}: auto_class: {declared!r} is not a model entry of config.json's auto_map "
            f"({', '.join(offered) or 'none'})"
        )
    return auto_map[declared]
