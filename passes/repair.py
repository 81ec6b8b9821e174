"""repair: reset the merged model's normalisation statistics on calibration data.

BatchNorm running statistics of a merged model are averages of the parents' and do not
describe the merged features; recomputing them (cumulative average: momentum None, only
the norm layers in train mode, everything else in eval) restores accuracy.

Example::

    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    >>> repair(net, [torch.randn(8, 3, 8, 8) + 5], progress=False)     # number of norms reset
    1
    >>> bool(net[1].running_mean.abs().sum() > 0), net.training       # flags restored
    (True, False)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from hmir.pipeline.manager import Out, Pass, register_pass

_NORMS = (nn.modules.batchnorm._BatchNorm,)


def has_norms(module: nn.Module) -> bool:
    """Whether ``module`` has any norm layer with running statistics."""
    return any(isinstance(m, _NORMS) and m.track_running_stats for m in module.modules())


def repair(module: nn.Module, data, *, progress: bool = True) -> int:
    """Recompute running stats of every BatchNorm of ``module`` (in place) over ``data``."""
    norms = [m for m in module.modules() if isinstance(m, _NORMS) and m.track_running_stats]
    if not norms:
        return 0
    p = next(module.parameters())
    saved = {m: (m.momentum, m.training) for m in module.modules() if isinstance(m, _NORMS)}
    flags = {m: m.training for m in module.modules()}
    module.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with torch.no_grad():
            for x in tqdm(data, desc="repair", disable=not progress, leave=False):
                module(x.to(device=p.device, dtype=p.dtype if x.is_floating_point() else x.dtype))
    finally:
        for m, (mom, _) in saved.items():
            m.momentum = mom
        for m, t in flags.items():
            m.training = t
    return len(norms)


@dataclass(frozen=True)
class RepairOptions:
    """``enabled``: reset the merged model's norm statistics (compile_merge's ``repair=``)."""

    enabled: bool = True
    name: str = "repair"


class Repair(Pass):
    """Reset the merged module's BatchNorm statistics on the calibration data (in place on the
    merged module, which hmir built; never on the user's models)."""

    name = "repair"
    requires = ("module", "calib")
    provides = ("module",)
    options = RepairOptions

    def skip(self, state):
        return None if has_norms(state.module) else "the merged model has no norm statistics"

    def run(self, state, options: RepairOptions) -> Out:
        if not options.enabled:
            return Out({}, ["repair: off (norm statistics are the merged parents' averages)"])
        n = repair(state.module, state.calib, progress=state.progress)
        return Out({"module": state.module}, [f"repair: reset the running statistics of {n} norm layers"])


register_pass(Repair())
