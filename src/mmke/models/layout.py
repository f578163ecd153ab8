"""Edit sites of a loaded model, found by role (decoder layer, MLP, attention, projector, vision layer).

A family declares where each part may live as candidate module paths (its ``LayoutSpec``:
newest transformers layout first, older ones as fallbacks); ``Layout`` resolves them against
the real module tree and hands out module names usable with ``model.get_submodule``. Methods
ask for a role (``layout.mlp(-1)``) and never spell a per-version name themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from mmke.errors import MmkeError
from mmke.models.families._base import LayoutSpec


class LayoutError(MmkeError):
    """A model has no module for the requested role (e.g. a projector on a text-only model)."""


class Layout:
    """Named edit sites of one model instance, resolved from its module tree by role."""

    def __init__(self, model: nn.Module, spec: LayoutSpec) -> None:
        self.model = model
        self.spec = spec

    # --- language model -------------------------------------------------------------------

    def decoder_layers(self) -> list[str]:
        """Module names of the language decoder layers, first to last."""
        return self._children(self._find("decoder layers", self.spec.decoder_layers))

    @property
    def n_layers(self) -> int:
        return len(self.decoder_layers())

    def layer(self, layer: int = -1) -> str:
        """One decoder layer; negative indices count from the last."""
        return _pick(self.decoder_layers(), layer, "decoder layer")

    def mlp(self, layer: int = -1) -> str:
        """The MLP block of a decoder layer (for layers without one, e.g. OPT: its output projection)."""
        return self._inside(self.layer(layer), self.spec.mlp + self.spec.mlp_out, "mlp")

    def mlp_modules(self, layer: int = -1) -> list[str]:
        """Everything that makes up a layer's MLP: its MLP block, or, in layers without one (OPT),
        the MLP's linears (fc1 and fc2), so methods that edit "the MLP" edit all of it.
        """
        base = self.layer(layer)
        block = self._try(tuple(f"{base}.{c}" for c in self.spec.mlp))
        if block is not None:
            return [block]
        parts = [p for p in (f"{base}.{c}" for c in self.spec.mlp_parts) if self._try((p,))]
        return parts or [self.mlp(layer)]

    def mlp_out(self, layer: int = -1) -> str:
        """The MLP's output (down) projection of a layer: the linear map ROME/MEMIT rewrite."""
        return self._inside(self.layer(layer), self.spec.mlp_out, "mlp output projection")

    def attention(self, layer: int = -1) -> str:
        """The self-attention block of a decoder layer."""
        return self._inside(self.layer(layer), self.spec.attention, "attention")

    def embeddings(self) -> str:
        """The input token embedding."""
        return self._name_of(self._hf_module("get_input_embeddings"), "input embeddings")

    def lm_head(self) -> str:
        """The output projection to the vocabulary."""
        return self._name_of(self._hf_module("get_output_embeddings"), "lm head")

    # --- vision side ----------------------------------------------------------------------

    @property
    def has_vision(self) -> bool:
        return self._try(self.spec.vision_tower) is not None

    def vision_tower(self) -> str:
        """The vision encoder as a whole."""
        return self._find("vision tower", self.spec.vision_tower)

    def vision_layers(self) -> list[str]:
        """Module names of the vision encoder's layers whose output reaches the language model,
        first to last: up to the config's ``vision_feature_layer`` (LLaVA-1.5 reads the
        second-to-last layer's output, so its last layer is never used and an edit there could not
        change an answer)."""
        layers = self._children(self._find("vision layers", self.spec.vision_layers))
        return layers[: _layers_used(getattr(self.model.config, "vision_feature_layer", None), len(layers))]

    def vision_layer(self, layer: int = -1) -> str:
        return _pick(self.vision_layers(), layer, "vision layer")

    def projector(self) -> str:
        """The module that maps vision features into the language model (projector / connector)."""
        return self._find("projector", self.spec.projector)

    def qformer(self) -> str:
        """BLIP-2's Q-Former (its learned query tokens are a parameter of the model root)."""
        return self._find("Q-Former", self.spec.qformer)

    # --- access ---------------------------------------------------------------------------

    def module(self, site: str) -> nn.Module:
        try:
            return self.model.get_submodule(site)
        except AttributeError:
            raise LayoutError(f"{type(self.model).__name__} has no module {site!r}") from None

    def params(self, site: str) -> dict[str, nn.Parameter]:
        """Parameters under a site, keyed by their full name in the model (for ``get_parameter``)."""
        prefix = f"{site}." if site else ""
        return {f"{prefix}{name}": p for name, p in self.module(site).named_parameters()}

    def roles(self) -> dict[str, str | list[str] | None]:
        """Every role this model resolves (None where it has none): a map for logs and debugging."""
        out: dict[str, str | list[str] | None] = {}
        for role in ("embeddings", "lm_head", "vision_tower", "projector", "qformer"):
            try:
                out[role] = getattr(self, role)()
            except LayoutError:
                out[role] = None
        out["decoder_layers"] = self.decoder_layers()
        out["mlp"] = self.mlp(-1)
        out["attention"] = self.attention(-1)
        out["vision_layers"] = self.vision_layers() if self.spec.vision_layers and self.has_vision else None
        return out

    # --- resolution -----------------------------------------------------------------------

    def _try(self, candidates: tuple[str, ...]) -> str | None:
        for path in candidates:
            try:
                self.model.get_submodule(path)
            except AttributeError:
                continue
            return path
        return None

    def _find(self, role: str, candidates: tuple[str, ...]) -> str:
        path = self._try(candidates)
        if path is None:
            kind = type(self.model).__name__
            tried = ", ".join(candidates) or "none declared"
            raise LayoutError(f"{kind} has no {role} (looked for: {tried})")
        return path

    def _inside(self, layer: str, candidates: tuple[str, ...], role: str) -> str:
        return self._find(role, tuple(f"{layer}.{c}" for c in candidates))

    def _children(self, container: str) -> list[str]:
        return [f"{container}.{name}" for name, _ in self.module(container).named_children()]

    def _hf_module(self, getter: str) -> nn.Module:
        module = getattr(self.model, getter, lambda: None)()
        if module is None:
            raise LayoutError(f"{type(self.model).__name__}.{getter}() returned nothing")
        return module

    def _name_of(self, target: nn.Module, role: str) -> str:
        # Shared (tied) modules appear once in named_modules, under their first name.
        for name, module in self.model.named_modules():
            if module is target:
                return name
        raise LayoutError(f"{type(self.model).__name__}: {role} is not a submodule of the model")


def _layers_used(feature_layer: int | Sequence[int] | None, n: int) -> int:
    """How many of ``n`` vision layers feed hidden state ``feature_layer`` (an index into the n + 1
    hidden states, the embeddings first; a list: the deepest of them; None: all)."""
    if feature_layer is None:
        return n
    if not isinstance(feature_layer, int):
        return max(_layers_used(f, n) for f in feature_layer)
    return feature_layer if feature_layer >= 0 else n + 1 + feature_layer


def _pick(names: list[str], index: int, role: str) -> str:
    if not -len(names) <= index < len(names):
        raise LayoutError(f"{role} {index} out of range: the model has {len(names)}")
    return names[index]
