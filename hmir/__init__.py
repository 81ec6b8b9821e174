"""hmir: merge trained PyTorch models of different architectures, without training.

Example::

    >>> from hmir import compile_merge
    >>> result = compile_merge(model_a, model_b, calib_batches, method="zip")   # doctest: +SKIP
    >>> merged = result.module
"""
from hmir import _compat
from hmir.errors import (CalibrationError, HMIRError, IncompatibleModelsError, LoweringError,
                         MergeError, TraceError, UnsupportedOpError, VerificationError)

from hmir.api import MergeResult, compile_merge, depth_plan  # noqa: E402
from hmir.passes.depth import DepthOptions  # noqa: E402
from hmir.passes.insert import inflate  # noqa: E402

_compat.install()          # the old flat module paths (hmir.matching, hmir.zoo, ...) still import

__version__ = "0.1.0"
__all__ = ["compile_merge", "depth_plan", "DepthOptions", "inflate", "MergeResult", "HMIRError", "LoweringError", "TraceError", "UnsupportedOpError", "VerificationError",
           "IncompatibleModelsError", "CalibrationError", "MergeError"]
