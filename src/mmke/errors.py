"""Exceptions mmke raises for bad input; each message is one line saying what is wrong and where."""

from __future__ import annotations


class MmkeError(Exception):
    """Base of every error the CLI reports as one clean line."""


class BadRecordError(MmkeError):
    """A data record (case, probe, image) is malformed; the message names file, line and case."""


class UnknownNameError(MmkeError, KeyError):
    """A registry lookup missed; the message lists close matches."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConfigError(MmkeError):
    """A configuration key or value is invalid."""


class ModelLoadError(MmkeError):
    """A model directory is missing, incomplete or of an unsupported architecture."""


class EditorNotReadyError(MmkeError):
    """An editor (or a reader needing a model) lacks what it needs: training, a train split, a package."""
