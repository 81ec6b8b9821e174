"""hmir: merge trained PyTorch models of different architectures, without training.

Example::

    >>> from hmir import compile_merge
    >>> import torch
    >>> from hmir.harness import zoo
    >>> result = compile_merge(zoo.resnet20(), zoo.resnet26(), [torch.randn(8, 3, 32, 32)],
    ...                        method="zip", progress=False)
    >>> merged = result.module              # a plain nn.Module: ResNet-26's depth
    >>> "match" in list_passes(), merged(torch.randn(2, 3, 32, 32)).shape
    (True, torch.Size([2, 10]))
"""
from hmir import _compat
from hmir.errors import (CalibrationError, HMIRError, IncompatibleModelsError, LoweringError,
                         MergeError, TraceError, UnsupportedOpError, VerificationError)

from hmir.api import MergeResult, compile_merge, depth_plan, run_pipeline  # noqa: E402
from hmir.pipeline.manager import Pass, list_passes, register_pass  # noqa: E402
from hmir.pipeline.methods import MergeMethod, Param, get_method, register_method  # noqa: E402
from hmir.pipeline.state import MergeState  # noqa: E402
from hmir.passes.depth import DepthOptions  # noqa: E402
from hmir.passes.insert import inflate  # noqa: E402

_compat.install()          # the old flat module paths (hmir.matching, hmir.zoo, ...) still import

__version__ = "0.1.0"
__all__ = ["compile_merge", "run_pipeline", "depth_plan", "list_passes", "register_pass", "Pass",
           "MergeState", "MergeMethod", "Param", "register_method", "get_method", "DepthOptions", "inflate", "MergeResult", "HMIRError", "LoweringError", "TraceError", "UnsupportedOpError", "VerificationError",
           "IncompatibleModelsError", "CalibrationError", "MergeError"]
