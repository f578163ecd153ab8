"""mmke: edit the knowledge of vision-language models and measure how well each edit worked.

The Python API (docs/api.md): ``load_model``, ``load_benchmark``, ``load_method``, ``edit_case`` and
``evaluate``, plus the data types. Importing mmke does not import torch; loading a model does.
"""

from mmke.api import edit_case, evaluate, load_benchmark, load_method, load_model
from mmke.errors import BadRecordError, ConfigError, MmkeError, ModelLoadError, UnknownNameError
from mmke.types import AttackType, EditCase, EditFact, EditType, ImageRef, Probe, ProbeKind, Sample

__all__ = [
    "AttackType",
    "BadRecordError",
    "ConfigError",
    "EditCase",
    "EditFact",
    "EditType",
    "ImageRef",
    "MmkeError",
    "ModelLoadError",
    "Probe",
    "ProbeKind",
    "Sample",
    "UnknownNameError",
    "edit_case",
    "evaluate",
    "load_benchmark",
    "load_method",
    "load_model",
]

__version__ = "0.1.0"
