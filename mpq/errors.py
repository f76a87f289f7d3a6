"""Errors that name what is wrong and what is allowed.

Every error a user can cause derives from :class:`MpqError` and from the built-in exception a caller would expect
(``ValueError`` for bad values), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class MpqError(Exception):
    """Base class of every mpq error."""


class ConfigError(MpqError, ValueError):
    """A bit config (or one of its layers) that the model or the device cannot take."""


class BudgetError(MpqError, ValueError):
    """A budget that no allocation can meet; ``smallest`` holds the smallest reachable value of each resource."""

    def __init__(self, message: str, smallest: dict[str, float] | None = None):
        super().__init__(message)
        self.smallest = dict(smallest or {})


class CalibrationError(MpqError, ValueError):
    """Calibration data that is empty, inconsistent, or does not fit the model."""


class ModelError(MpqError, ValueError):
    """A model mpq cannot search as it is (e.g. NaN or Inf weights), named by the layer that has the problem."""


class RunDirectoryError(MpqError, ValueError):
    """A run directory that cannot be read, resumed or written to (not a run, a damaged file, a user's own files)."""


class NoQuantizableLayersError(MpqError, ValueError):
    """The model has no layer that mpq can quantize."""


class KernelUnavailableError(MpqError, RuntimeError):
    """A kernel that this machine or this PyTorch build cannot run."""
