"""mmke: edit the knowledge of vision-language models and measure how well each edit worked."""

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
]

__version__ = "0.1.0"
