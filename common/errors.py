"""Typed errors. Each message names the offending value and how to fix it."""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FedstreamError",
    "ModelError",
    "PrivacyError",
    "TrainingError",
]


class FedstreamError(Exception):
    """Base class; CLIs print ``str(err)`` as one line and exit non-zero."""


class ConfigError(FedstreamError, ValueError):
    """A configuration value is invalid; the message names the field."""


class ModelError(FedstreamError):
    """A base model or tokenizer cannot be found or loaded."""


class DataError(FedstreamError):
    """Training or evaluation data is missing or unusable."""


class PrivacyError(FedstreamError):
    """A privacy setting or budget makes the requested training impossible."""


class TrainingError(FedstreamError):
    """Local training produced an update that must not leave the host."""


class CheckpointError(FedstreamError):
    """A saved global adapter is missing, corrupt or from another run."""
