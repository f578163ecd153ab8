"""IKE: in-context knowledge editing. Zheng et al., "Can We Edit Factual Knowledge by In-Context
Learning?", EMNLP 2023; run on vision-language models as in VLKEB (Huang et al. 2024).

A demonstration corpus is built from the train cases (per case: the fact copied, a rephrase and
a locality line), embedded once with all-MiniLM-L6-v2 and cached on disk. Editing a case puts
its k nearest demonstrations and its own fact before every prompt; the image stays in the
model's own image slot. The model's weights are never touched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmke.cache import cache_dir
from mmke.embeddings import MiniLM, TextEmbedder, embedder_name, unit_rows
from mmke.errors import ConfigError
from mmke.io import atomic_path
from mmke.methods.base import Editor, EditorNotReadyError, PromptEdited
from mmke.models.base import LVLM
from mmke.registry import register_method
from mmke.types import EditCase, ProbeKind

#: Bumped when the corpus lines or the cache file layout change, so old caches are never read.
_CACHE_VERSION = "ike-demos/1"


@dataclass(frozen=True)
class IKEConfig:
    """``k`` demonstrations (VLKEB 32, MMKE-Bench 25; 0 = only the case's own fact).

    ``cache_dir`` overrides where embeddings are kept (default: ``mmke.cache.cache_dir()/ike``).
    """

    k: int = 32
    cache_dir: str | None = None
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ConfigError(f"ike k must be >= 0, got {self.k}")
        if self.batch_size < 1:
            raise ConfigError(f"ike batch_size must be >= 1, got {self.batch_size}")


# --- the demonstration corpus ---------------------------------------------------------------


def demo(fact: str, prompt: str) -> str:
    """One demonstration in VLKEB's format."""
    return f"New Fact: {fact}\nPrompt: {prompt}\n\n"


def fact_of(case: EditCase) -> str:
    return f"{case.edit.prompt} {case.edit.target}"


def demo_lines(case: EditCase) -> list[str]:
    """A train case's demonstrations: the fact copied, its first text rephrase, its first text-locality probe.

    A case without a rephrase or a text-locality probe contributes fewer lines.
    """
    fact = fact_of(case)
    lines = [demo(fact, fact)]
    rephrases = case.probes_of(ProbeKind.TEXT_GENERALITY)
    if rephrases:
        lines.append(demo(fact, f"{rephrases[0].prompt} {case.edit.target}"))
    unrelated = case.probes_of(ProbeKind.TEXT_LOCALITY)
    if unrelated:
        lines.append(demo(fact, f"{unrelated[0].prompt} {unrelated[0].target}"))
    return lines


def demo_corpus(cases: Sequence[EditCase]) -> list[str]:
    return [line for case in cases for line in demo_lines(case)]


# --- retrieval ----------------------------------------------------------------------------


class Retriever:
    """Demonstrations with unit-norm embeddings (N, D); ``nearest`` ranks them by dot product."""

    def __init__(self, sentences: Sequence[str], embeddings: np.ndarray, embedder: TextEmbedder) -> None:
        if len(sentences) != embeddings.shape[0]:
            raise ValueError(f"{len(sentences)} sentences but {embeddings.shape[0]} embeddings")
        self.sentences = tuple(sentences)
        self.embeddings = embeddings  # (N, D)
        self.embedder = embedder

    def nearest(self, query: str, k: int) -> list[str]:
        """The ``k`` demonstrations most similar to ``query``, most similar first (ties: corpus order)."""
        q = unit_rows(self.embedder([query]))[0]  # (D,)
        sims = self.embeddings @ q  # (N,)
        order = np.argsort(-sims, kind="stable")[:k]  # (k,)
        return [self.sentences[i] for i in order]


def build_retriever(
    sentences: Sequence[str], embedder: TextEmbedder, root: Path, batch_size: int = 64
) -> Retriever:
    """Embed ``sentences`` once, keyed by their text and the embedder's name; later calls load the file."""
    path = root / f"{_corpus_key(sentences, embedder_name(embedder))}.npy"
    cached = _load(path, len(sentences))
    if cached is None:
        cached = _embed(sentences, embedder, batch_size)  # (N, D)
        _save(path, cached)
    return Retriever(sentences, cached, embedder)


def _embed(sentences: Sequence[str], embedder: TextEmbedder, batch_size: int) -> np.ndarray:
    parts = [embedder(sentences[i : i + batch_size]) for i in range(0, len(sentences), batch_size)]
    return unit_rows(np.concatenate([np.asarray(p, dtype=np.float32) for p in parts]))  # (N, D)


def _corpus_key(sentences: Sequence[str], name: str) -> str:
    h = hashlib.sha256(f"{_CACHE_VERSION}\n{name}\n".encode())
    for s in sentences:
        h.update(s.encode())
        h.update(b"\0")  # separator: ["ab", "c"] and ["a", "bc"] must differ
    return h.hexdigest()[:32]


def _load(path: Path, rows: int) -> np.ndarray | None:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    # a file of the wrong shape is damaged: re-embed rather than trust it
    return arr if arr.ndim == 2 and arr.shape[0] == rows else None


def _save(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)


# --- the editor ---------------------------------------------------------------------------


@register_method("ike")
class IKE(Editor[IKEConfig]):
    """IKE: in-context editing with retrieved demonstrations (no weight change)."""

    name = "ike"
    defaults = IKEConfig()
    in_context = True
    batches = True

    def __init__(
        self, config: IKEConfig | Mapping[str, Any] | None = None, *, embedder: TextEmbedder | None = None
    ) -> None:
        super().__init__(config)
        self.embedder: TextEmbedder = embedder or MiniLM(batch_size=self.config.batch_size, needed_by="ike")
        self.retriever: Retriever | None = None

    @property
    def needs_train_cases(self) -> bool:
        return self.config.k > 0

    def train(self, model: LVLM, train_cases: Sequence[EditCase]) -> None:
        self.prepare(train_cases)

    def prepare(self, train_cases: Sequence[EditCase]) -> Retriever:
        """Build (or load from the cache) the demonstration index of the train cases."""
        sentences = demo_corpus(train_cases)
        if not sentences:
            raise EditorNotReadyError("ike: no train cases to draw demonstrations from")
        root = cache_dir(self.config.cache_dir) / "ike"
        self.retriever = build_retriever(sentences, self.embedder, root, self.config.batch_size)
        return self.retriever

    def context(self, case: EditCase) -> str:
        """What goes before every probe prompt: k demonstrations, the case's own fact, then its template."""
        fact = fact_of(case)
        own = demo(fact, fact)
        demos = self._retrieve(own) if self.config.k > 0 else []
        return "".join([*demos, own]) + f"New Fact: {fact}\nPrompt: "

    def apply(self, model: LVLM, case: EditCase) -> PromptEdited:
        prefix = self.context(case)
        return PromptEdited(model, lambda prompt: prefix + prompt, details={"context": prefix})

    def apply_many(self, model: LVLM, cases: Sequence[EditCase]) -> PromptEdited:
        """Every case's fact in one context; each prompt is then asked about the batch's fact nearest to it.

        The context is k demonstrations (taken in turn from each fact's nearest, without repeats),
        every fact copied, and IKE's final ``New Fact: ...\nPrompt:`` line. That line names one
        fact: the one whose embedding is nearest the prompt's (as IKE's demonstrations are
        retrieved). One case gives exactly ``apply``'s context.
        """
        if len(cases) == 1:
            return self.apply(model, cases[0])
        facts = [fact_of(c) for c in cases]
        owns = [demo(f, f) for f in facts]
        nearest = [self._retrieve(own) for own in owns] if self.config.k > 0 else []
        turns = dict.fromkeys(d for rank in zip(*nearest, strict=True) for d in rank)
        common = "".join([*list(turns)[: self.config.k], *owns])
        index = Retriever(facts, _embed(facts, self.embedder, self.config.batch_size), self.embedder)

        def rewrite(prompt: str) -> str:
            (fact,) = index.nearest(prompt, 1)
            return f"{common}New Fact: {fact}\nPrompt: {prompt}"

        return PromptEdited(model, rewrite, details={"context": common, "facts": facts})

    def _retrieve(self, query: str) -> list[str]:
        if self.retriever is None:
            raise EditorNotReadyError(
                "ike has no demonstration corpus: call editor.train(model, train_cases) "
                "(or editor.prepare(train_cases)) before apply, or set k=0"
            )
        # the query is the new fact in demonstration form, as in VLKEB
        return self.retriever.nearest(query, self.config.k)
