"""SERAC: an edit memory, a scope classifier and a counterfactual model beside an untouched base model
(Mitchell et al. 2022, "Memory-Based Model Editing at Scale", ICML 2022).

``apply`` stores the edit (prompt, target, image) in a memory of live edits and returns a
``SeracEdited`` handle; ``restore`` removes it again (stacked edits are many live entries, removed
in reverse order). The base model's weights are never changed.

Scope classifier (differs from the reference SERAC_MULTI, which routes on distilbert text alone,
so an image-rephrase probe routes like its edit and a look-alike of another entity cannot be told
apart): each item is embedded as a pair of unit vectors, a text part (frozen all-MiniLM-L6-v2
embedding of the prompt through a trained linear map, initialised as the identity) and an image
part (the base LVLM's own projector output, mean- and max-pooled over the image tokens, no grad,
standardised with train-split statistics, through a trained two-layer MLP; a learned vector
stands for "no image"). Max-pooling keeps small distinguishing parts (a badge's colour) that the
mean washes out; the image-locality probes are look-alikes that differ in exactly such a part.
An item's in-scope logit for an edit is ``a·cos_text + b·cos_image + c`` with learned a, b, c:
an additive AND of "same question" and "same entity". Routing is hard: an item
goes to the live edit with the highest probability when that exceeds ``threshold`` (0.5), else to
the base model. The reference mixes softly, (1-s)·p_base + s·p_cf; hard routing keeps out-of-scope
scores bit-identical to the unedited model and needs one model per item, not two.

Counterfactual model: the base architecture with its last ``cf_layers`` decoder layers (by role,
``layout.decoder_layers()``) replaced by trained copies; every other weight is the base model's.
Only those copies (and the classifier) are the editor's networks, so the saved editor is small and
no second full model is ever held in memory: in-scope items are scored with the copies swapped in
for the duration of the call (the reference trains a separate model, of which only layer "31" of
the 7B ones). In-scope items are asked ``"{edit prompt} {edit target} . {probe prompt}"`` with the
probe's own image in the model's image slot.

Meta-training (``meta_loss``): ``cloc`` x a group-balanced BCE of the classifier over every
(probe, edit) pair of the batch (positives: a case's reliability / generality probes against its
own edit; hard negatives: its locality probes; easy negatives: every other case's probes; the
three groups weigh equally), plus ``cedit`` x the
counterfactual NLL of the in-scope text probes and ``iedit`` x that of its image-generality probes
(the anchors' 0.1 / 1 / 0.1). Under hard routing the locality KL of the reference is carried by the
classifier term. MiniLM embeddings and image features of the train split are computed once in
``prepare`` (and cached per editor instance). Portability and robustness probes are not trained
on; they are routed like any other probe.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmke.embeddings import MiniLM, TextEmbedder
from mmke.errors import ConfigError
from mmke.methods.base import RoutedEdited, swap_module
from mmke.methods.trainable import TrainableEditor, TrainingConfig
from mmke.models.base import LVLM, Item
from mmke.models.batch import Batch
from mmke.models.features import pooled_image_features
from mmke.registry import register_method
from mmke.types import EditCase, EditFact, ImageRef, Probe, ProbeKind, Sample

#: Probes that ask the edited fact itself (in scope of their case's edit).
IN_SCOPE_KINDS = frozenset(
    {
        ProbeKind.RELIABILITY,
        ProbeKind.TEXT_RELIABILITY,
        ProbeKind.IMAGE_RELIABILITY,
        ProbeKind.TEXT_GENERALITY,
        ProbeKind.IMAGE_GENERALITY,
    }
)
#: Out of scope of every edit.
OUT_OF_SCOPE_KINDS = frozenset({ProbeKind.TEXT_LOCALITY, ProbeKind.IMAGE_LOCALITY})


@dataclass(frozen=True)
class SeracConfig(TrainingConfig):
    """SERAC settings on top of the shared training fields.

    ``cf_layers`` last decoder layers form the counterfactual model; the classifier embeds images
    into ``proj_dim`` (text keeps MiniLM's width); ``threshold`` is the in-scope probability
    above which an item is routed to an edit; ``cedit`` / ``iedit`` / ``cloc`` weight the losses
    (see the module doc).
    ``feature_batch`` images or texts are embedded per forward. ``copy_share`` of the cases of a
    counterfactual-loss batch get a random vocabulary word as their target (edit and in-scope
    probes alike), so the counterfactual model learns to copy any word from the edit, not only the
    train split's answers (names it never saw as an answer were its weak point). The defaults suit
    the bundled world model (2000 steps, about 6 minutes on 2 CPU cores); the reference trains 7B
    models at lr 1e-5.
    """

    train_steps: int = 2000
    train_batch: int = 4
    train_lr: float = 1e-3
    checkpoint_every: int = 250
    cf_layers: int = 2
    proj_dim: int = 256
    threshold: float = 0.5
    cedit: float = 0.1
    iedit: float = 0.1
    cloc: float = 1.0
    feature_batch: int = 64
    copy_share: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cf_layers < 1 or self.proj_dim < 1 or self.feature_batch < 1:
            raise ConfigError("serac cf_layers, proj_dim and feature_batch must be >= 1")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"serac threshold must be in (0, 1), got {self.threshold}")
        if min(self.cedit, self.iedit, self.cloc) < 0:
            raise ConfigError("serac loss weights cedit, iedit and cloc must be >= 0")
        if not 0.0 <= self.copy_share <= 1.0:
            raise ConfigError(f"serac copy_share must be in [0, 1], got {self.copy_share}")


# --- networks -----------------------------------------------------------------------------


class ScopeClassifier(nn.Module):
    """In-scope logits of items for edits from (text, image) embeddings: a·cos_t + b·cos_i + c."""

    def __init__(self, text_dim: int, image_dim: int, dim: int) -> None:
        super().__init__()
        self.text_dim = text_dim
        self.text = nn.Linear(text_dim, text_dim)
        with torch.no_grad():  # start from MiniLM's own cosine
            self.text.weight.copy_(torch.eye(text_dim))
            self.text.bias.zero_()
        self.image = nn.Sequential(nn.Linear(image_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.no_image = nn.Parameter(torch.randn(dim))
        self.scale = nn.Parameter(torch.tensor([8.0, 8.0]))  # (text, image)
        self.bias = nn.Parameter(torch.tensor(-12.0))
        self.register_buffer("image_mean", torch.zeros(image_dim))
        self.register_buffer("image_std", torch.ones(image_dim))

    def embed(self, text: torch.Tensor, image: torch.Tensor, has_image: torch.Tensor) -> torch.Tensor:
        """Unit text and image parts side by side (N, Dt + d); text (N, Dt), image (N, Di), has_image (N,)."""
        t = F.normalize(self.text(text), dim=-1)  # (N, Dt)
        i = self.image((image - self.image_mean) / self.image_std)  # (N, d)
        i = torch.where(has_image[:, None], i, self.no_image.expand_as(i))  # (N, d)
        return torch.cat([t, F.normalize(i, dim=-1)], dim=1)  # (N, Dt + d)

    def logits(self, items: torch.Tensor, edits: torch.Tensor) -> torch.Tensor:
        """(N, M) in-scope logits of items (N, Dt + d) against edits (M, Dt + d)."""
        k = self.text_dim
        cos_t = items[:, :k] @ edits[:, :k].T  # (N, M)
        cos_i = items[:, k:] @ edits[:, k:].T  # (N, M)
        return self.scale[0] * cos_t + self.scale[1] * cos_i + self.bias  # (N, M)


class SeracNets(nn.Module):
    """What SERAC trains and saves: the scope classifier and copies of the last decoder layers."""

    def __init__(
        self, classifier: ScopeClassifier, layers: Sequence[nn.Module], sites: Sequence[str]
    ) -> None:
        super().__init__()
        self.classifier = classifier
        self.cf_layers = nn.ModuleList(layers)
        self.sites = tuple(sites)  # where each copy goes in the base model (not state)

    def train(self, mode: bool = True) -> SeracNets:
        """The layer copies stay in eval mode, as the base model does: no dropout, deterministic resume."""
        super().train(mode)
        self.cf_layers.eval()
        return self


@contextmanager
def counterfactual(model: LVLM, nets: SeracNets) -> Iterator[None]:
    """While active ``model`` is the counterfactual model: the trained layer copies are swapped in."""
    originals: list[tuple[str, nn.Module]] = []
    try:
        for site, layer in zip(nets.sites, nets.cf_layers, strict=True):
            originals.append((site, swap_module(model.model, site, layer)))
        yield
    finally:
        for site, original in reversed(originals):
            swap_module(model.model, site, original)


# --- features -----------------------------------------------------------------------------


class Features:
    """Frozen classifier inputs of one model: MiniLM text embeddings and pooled image features, cached."""

    def __init__(self, model: LVLM, embedder: TextEmbedder, batch_size: int) -> None:
        self.model, self.embedder, self.batch_size = model, embedder, batch_size
        self.multimodal = model.family.multimodal and model.layout.has_vision
        width = int(model.model.get_input_embeddings().weight.shape[1])  # the projector maps into it
        self.image_dim = 2 * width if self.multimodal else 1
        self._texts: dict[str, torch.Tensor] = {}
        self._images: dict[str, torch.Tensor] = {}

    def of(self, items: Sequence[Item]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Text (N, Dt), image (N, Di) features and has_image (N,) of ``items``' prompts and images."""
        text = self.texts([it.prompt for it in items])  # (N, Dt)
        refs = [it.image if self.multimodal else None for it in items]
        pics = self.images([r for r in refs if r is not None])
        has = torch.tensor([r is not None for r in refs], device=text.device)  # (N,)
        image = torch.zeros(len(items), self.image_dim, device=text.device)  # (N, Di)
        if pics:
            image[has] = torch.stack(pics)
        return text, image, has

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        todo = sorted({t for t in texts if t not in self._texts})
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            vecs = np.asarray(self.embedder(chunk), dtype=np.float32)  # (n, Dt)
            vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
            for t, v in zip(chunk, torch.from_numpy(vecs).to(self.model.device), strict=True):
                self._texts[t] = v
        return torch.stack([self._texts[t] for t in texts]) if texts else torch.zeros(0, 1)

    def images(self, refs: Sequence[ImageRef]) -> list[torch.Tensor]:
        todo = sorted({r.path for r in refs if r.path not in self._images})
        for start in range(0, len(todo), self.batch_size):
            chunk = [ImageRef(p) for p in todo[start : start + self.batch_size]]
            for ref, vec in zip(chunk, pooled_image_features(self.model, chunk), strict=True):
                self._images[ref.path] = vec
        return [self._images[r.path] for r in refs]


def prefixed(edit: EditFact, item: Item) -> Sample:
    """What the counterfactual model is asked: the edit as context, then the probe (image kept)."""
    return Sample(f"{edit.prompt} {edit.target} . {item.prompt}", item.target, item.image)


def item_nll(model: LVLM, batch: Batch) -> torch.Tensor:
    """Each item's mean target NLL (B,), differentiable."""
    logits = model.logits(batch)  # (N, V)
    nll = F.cross_entropy(logits.float(), batch.answer_labels, reduction="none")  # (N,)
    rows, _ = batch.answer_positions  # (N,)
    lengths = torch.tensor(batch.answer_lengths, dtype=nll.dtype, device=nll.device)  # (B,)
    return torch.zeros_like(lengths).index_add(0, rows, nll) / lengths  # (B,)


# --- the edit memory and its handle ---------------------------------------------------------


@dataclass(eq=False)
class MemoryEntry:
    """One live edit: its fact and its classifier embedding (Dt + d,)."""

    edit: EditFact
    key: torch.Tensor


class SeracEdited(RoutedEdited):
    """A live SERAC edit: items are routed per item to the counterfactual model or the base model."""

    def __init__(self, model: LVLM, editor: Serac, entries: Sequence[MemoryEntry]) -> None:
        super().__init__(model, {"memory_size": len(editor.memory(model))})
        self.editor, self.entries = editor, tuple(entries)

    def routes(self, items: Sequence[Item]) -> list[MemoryEntry | None]:
        """The live edit each item is in scope of, or None for the base model."""
        self._check_live()
        return self.editor.route(self.model, items)

    def view(self, items: Sequence[Item]) -> list[Item]:
        """The prompts as asked: edit-prefixed for routed items (those go to the counterfactual model)."""
        routes = self.routes(items)
        return [it if r is None else prefixed(r.edit, it) for it, r in zip(items, routes, strict=True)]

    def _split(self, items: Sequence[Item], run: Callable[[list[Item]], Sequence[Any]]) -> list[Any]:
        """``run`` on the base items, then on the prefixed in-scope items with the copies swapped in."""
        routes = self.routes(items)
        base = [i for i, r in enumerate(routes) if r is None]
        edited = [i for i, r in enumerate(routes) if r is not None]
        out: list[Any] = [None] * len(items)
        if base:
            for i, res in zip(base, run([items[i] for i in base]), strict=True):
                out[i] = res
        if edited:
            asked = [prefixed(routes[i].edit, items[i]) for i in edited]  # type: ignore[union-attr]
            with counterfactual(self.model, self.editor.nets(self.model)):
                for i, res in zip(edited, run(asked), strict=True):
                    out[i] = res
        return out

    def _release(self) -> None:
        for entry in self.entries:
            self.editor.forget(self.model, entry)


# --- the editor ---------------------------------------------------------------------------


@register_method("serac")
class Serac(TrainableEditor[SeracConfig]):
    """SERAC: edit memory + multimodal scope classifier + counterfactual last layers; weights untouched."""

    name = "serac"
    defaults = SeracConfig()
    batches = True

    def __init__(
        self, config: SeracConfig | Mapping[str, Any] | None = None, *, embedder: TextEmbedder | None = None
    ) -> None:
        super().__init__(config)
        self.embedder: TextEmbedder = embedder or MiniLM(
            batch_size=self.config.feature_batch, needed_by="serac"
        )
        self._features: dict[int, Features] = {}
        self._stats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._memory: dict[int, list[MemoryEntry]] = {}
        self._vocab: dict[int, list[str]] = {}

    # --- training hooks -----------------------------------------------------------------------

    def features(self, model: LVLM) -> Features:
        if id(model) not in self._features:
            self._features[id(model)] = Features(model, self.embedder, self.config.feature_batch)
        return self._features[id(model)]

    def prepare(self, model: LVLM, train_cases: Sequence[EditCase]) -> None:
        """Embed every train text and image once; keep the image features' mean and std."""
        feats = self.features(model)
        items = [it for case in train_cases for it in (case.edit, *_trained_probes(case))]
        _, image, has = feats.of(items)
        if bool(has.any()):
            seen = image[has]  # (n, Di)
            self._stats[id(model)] = (seen.mean(0), seen.std(0).clamp_min(1e-4))

    def build(self, model: LVLM) -> SeracNets:
        feats = self.features(model)
        text_dim = int(feats.texts(["scope"]).shape[1])
        classifier = ScopeClassifier(text_dim, feats.image_dim, self.config.proj_dim)
        if id(model) in self._stats:
            classifier.image_mean.copy_(self._stats[id(model)][0])
            classifier.image_std.copy_(self._stats[id(model)][1])
        sites = model.layout.decoder_layers()[-self.config.cf_layers :]
        layers = [copy.deepcopy(model.layout.module(s)).requires_grad_(True) for s in sites]
        return SeracNets(classifier.to(model.device), layers, sites)

    def meta_loss(
        self, model: LVLM, nets: nn.Module, cases: Sequence[EditCase]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        nets = cast(SeracNets, nets)
        rows = [(c, p) for c, case in enumerate(cases) for p in _trained_probes(case)]
        labels = torch.zeros(len(rows), len(cases), device=model.device)  # (P, B)
        for r, (c, p) in enumerate(rows):
            labels[r, c] = float(p.kind in IN_SCOPE_KINDS)
        logits = self._scope_logits(model, nets, [p for _, p in rows], [c.edit for c in cases])
        own = torch.zeros_like(labels, dtype=torch.bool)  # (P, B): a probe against its own case's edit
        own[torch.arange(len(rows)), torch.tensor([c for c, _ in rows], dtype=torch.long)] = True
        l_cls = _balanced_bce(logits, labels, own)
        positives = [(cases[c].edit, p) for c, p in rows if p.kind in IN_SCOPE_KINDS]
        if self.config.copy_share > 0:
            positives = self._with_random_targets(model, positives, cases)
        l_edit, l_image = self._cf_losses(model, nets, positives)
        loss = self.config.cloc * l_cls + self.config.cedit * l_edit + self.config.iedit * l_image
        routed = (logits.sigmoid() > self.config.threshold).float()  # (P, B)
        stats = {
            "cls": float(l_cls.detach()),
            "edit": float(l_edit.detach()),
            "image_edit": float(l_image.detach()),
            "route_acc": float((routed == labels).float().mean()),
        }
        return loss, stats

    def _with_random_targets(
        self, model: LVLM, pairs: list[tuple[EditFact, Probe]], cases: Sequence[EditCase]
    ) -> list[tuple[EditFact, Probe]]:
        """``copy_share`` of the cases' edits (and their probes with the edit's answer) get a random word.

        The draw is keyed by the batch's case ids, so a resumed training repeats it exactly.
        """
        rng = random.Random("|".join(c.case_id for c in cases))
        words = self._words(model)
        swap = {id(c.edit): rng.choice(words) for c in cases if rng.random() < self.config.copy_share}
        out = []
        for edit, probe in pairs:
            new = swap.get(id(edit))
            if new is not None:
                probe = replace(probe, target=new) if probe.target == edit.target else probe
                edit = replace(edit, target=new)
            out.append((edit, probe))
        return out

    def _words(self, model: LVLM) -> list[str]:
        """Whole-word vocabulary entries (BPE space markers stripped), sorted: the random targets."""
        if id(model) not in self._vocab:
            tokenizer = getattr(model.processor, "tokenizer", model.processor)
            raw = (t.lstrip("Ġ▁") for t in tokenizer.get_vocab())
            self._vocab[id(model)] = sorted({w for w in raw if w.isalpha() and len(w) >= 3})
        return self._vocab[id(model)]

    def _scope_logits(
        self,
        model: LVLM,
        nets: SeracNets,
        items: Sequence[Item],
        edits: Sequence[EditFact],
    ) -> torch.Tensor:
        feats = self.features(model)
        probe = nets.classifier.embed(*feats.of(items))  # (P, Dt + d)
        edit = nets.classifier.embed(*feats.of(edits))  # (B, Dt + d)
        return nets.classifier.logits(probe, edit)  # (P, B)

    def _cf_losses(
        self,
        model: LVLM,
        nets: SeracNets,
        pairs: Sequence[tuple[EditFact, Item]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean counterfactual NLL of the text-side and of the image-generality in-scope probes."""
        zero = torch.zeros((), device=model.device)
        if not pairs or self.config.cedit == self.config.iedit == 0:
            return zero, zero
        with counterfactual(model, nets):
            nll = item_nll(model, model.encode([prefixed(e, p) for e, p in pairs]))  # (P,)
        is_image = torch.tensor(
            [getattr(p, "kind", None) == ProbeKind.IMAGE_GENERALITY for _, p in pairs], device=nll.device
        )  # (P,)
        text = nll[~is_image].mean() if bool((~is_image).any()) else zero
        image = nll[is_image].mean() if bool(is_image.any()) else zero
        return text, image

    # --- editing ------------------------------------------------------------------------------

    def apply(self, model: LVLM, case: EditCase) -> SeracEdited:
        return self.apply_many(model, [case])

    def apply_many(self, model: LVLM, cases: Sequence[EditCase]) -> SeracEdited:
        """Every case's edit into the memory at once; one handle forgets them all."""
        nets = self.nets(model)
        edits = [c.edit for c in cases]
        with torch.no_grad():
            keys = nets.classifier.embed(*self.features(model).of(edits))  # (K, Dt + d)
        entries = [MemoryEntry(edit, key) for edit, key in zip(edits, keys, strict=True)]
        self.memory(model).extend(entries)
        return SeracEdited(model, self, entries)

    def nets(self, model: LVLM) -> SeracNets:
        """The trained networks for ``model`` (``EditorNotReadyError`` when there are none)."""
        return cast(SeracNets, self.networks(model))

    def memory(self, model: LVLM) -> list[MemoryEntry]:
        """The live edits of ``model``, oldest first."""
        return self._memory.setdefault(id(model), [])

    def forget(self, model: LVLM, entry: MemoryEntry) -> None:
        mem = self.memory(model)
        mem[:] = [e for e in mem if e is not entry]

    def route(self, model: LVLM, items: Sequence[Item]) -> list[MemoryEntry | None]:
        """Per item the live edit with the highest in-scope probability above ``threshold``, else None."""
        mem = self.memory(model)
        if not mem or not items:
            return [None] * len(items)
        nets = self.nets(model)
        with torch.no_grad():
            emb = nets.classifier.embed(*self.features(model).of(items))  # (N, Dt + d)
            prob = nets.classifier.logits(emb, torch.stack([e.key for e in mem])).sigmoid()  # (N, M)
            best, which = prob.max(dim=1)  # (N,), (N,)
        threshold = self.config.threshold
        return [mem[int(w)] if float(b) > threshold else None for b, w in zip(best, which, strict=True)]


def _trained_probes(case: EditCase) -> list[Probe]:
    return [p for p in case.probes if p.kind in IN_SCOPE_KINDS or p.kind in OUT_OF_SCOPE_KINDS]


def _balanced_bce(logits: torch.Tensor, labels: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """BCE averaged per group (positives, own-case negatives, other cases' pairs), groups weighted equally.

    Own-case negatives are the hard ones (a locality probe, e.g. a look-alike image under the same
    question); averaged with the far more numerous other-case pairs they would hardly count.
    """
    each = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")  # (P, B)
    pos = labels > 0.5
    groups = (pos, own & ~pos, ~own & ~pos)
    parts = [each[m].mean() for m in groups if bool(m.any())]
    return torch.stack(parts).mean() if parts else logits.sum() * 0.0
