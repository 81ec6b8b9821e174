"""The backend: a standalone merged ``nn.Module`` (fx GraphModule) with the merged weights.

Example::

    >>> merged = emit(ir_a, state)           # runs on the device/dtype of ``state``
    >>> merged(x).shape
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx

from hmir.errors import MergeError
from hmir.ir import MergeIR


def emit(ir: MergeIR, state: dict[str, torch.Tensor]) -> fx.GraphModule:
    """A fresh GraphModule of ``ir``'s graph holding ``state`` (the user's model untouched)."""
    merged = copy.deepcopy(ir.graph_module)
    own = merged.state_dict()
    bad = [k for k in own if k in state and own[k].shape != state[k].shape]
    if bad:
        raise MergeError(f"{ir.name}: merged tensors changed shape ({bad[:3]}); resizing layers "
                         f"is not supported by this backend version")
    merged.load_state_dict(state, strict=True)
    merged.eval()
    return merged
