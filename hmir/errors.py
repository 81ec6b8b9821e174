"""One exception hierarchy for hmir: every error hmir raises is an :class:`HMIRError`.

Example::

    >>> from hmir.errors import HMIRError, UnsupportedOpError
    >>> issubclass(UnsupportedOpError, HMIRError)
    True
"""
from __future__ import annotations


class HMIRError(Exception):
    """Base class of every error hmir raises."""


class LoweringError(HMIRError):
    """A model could not be lowered to the merge IR."""


class TraceError(LoweringError):
    """torch.fx could not trace the model (e.g. data-dependent control flow)."""


class UnsupportedOpError(LoweringError):
    """A graph node no frontend rule covers."""


class VerificationError(HMIRError):
    """The IR violates one of its invariants (coverage, widths, fixed spaces)."""


class IncompatibleModelsError(HMIRError):
    """Two models cannot be merged as asked (different inputs, outputs or structure)."""


class CalibrationError(HMIRError):
    """The calibration data is empty or cannot be fed to the models."""


class MergeError(HMIRError):
    """A pass failed (matching, fusing, repair)."""


class ExportError(HMIRError):
    """A model could not be exported to ONNX, or the export does not match torch."""
