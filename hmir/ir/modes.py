"""Running a model for analysis without changing it: eval mode, no grad, flags restored.

Example::

    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    >>> with eval_mode(net):
    ...     y = net(torch.ones(1, 2))
    >>> net.training, y.requires_grad
    (True, False)
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run ``model`` in eval mode under no_grad, restoring every module's train flag after."""
    flags = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            yield model
    finally:
        for m, t in flags.items():
            m.training = t
