"""Editing methods: each registers by name (``methods.get("ft")``) and returns an ``Edited`` handle.

``editor.apply(model, case)`` writes one edit; the handle scores the edited model and
``restore()`` puts it back bit-identically. Shared mechanisms (snapshot/restore, freezing,
module swapping, config validation) live in ``mmke.methods.base``.
"""

from mmke.embeddings import MiniLM
from mmke.methods.base import (
    EditCollapsed,
    Edited,
    Editor,
    EditorNotReadyError,
    ModuleEdited,
    ParamEdited,
    PromptEdited,
    make_config,
    restore_params,
    snapshot,
    swap_module,
    trainable_only,
)
from mmke.methods.ft import FineTune, FTConfig
from mmke.methods.ike import IKE, IKEConfig, Retriever
from mmke.methods.noop import NoOp, NoOpConfig
from mmke.methods.trainable import EditorFileError, TrainableEditor, TrainingConfig

__all__ = [
    "IKE",
    "EditCollapsed",
    "Edited",
    "Editor",
    "EditorFileError",
    "EditorNotReadyError",
    "FTConfig",
    "FineTune",
    "IKEConfig",
    "MiniLM",
    "ModuleEdited",
    "NoOp",
    "NoOpConfig",
    "ParamEdited",
    "PromptEdited",
    "Retriever",
    "TrainableEditor",
    "TrainingConfig",
    "make_config",
    "restore_params",
    "snapshot",
    "swap_module",
    "trainable_only",
]
