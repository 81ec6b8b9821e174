"""lower: run both models once on the example batch (their outputs must agree in shape), then
lower them to merge IRs with one frontend (:func:`hmir.frontends.select.lower_pair`).

Example::

    >>> import torch
    >>> from hmir.pipeline.manager import get_pass
    >>> get_pass("lower").provides
    ('irs', 'frontends')
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from hmir.errors import CalibrationError, IncompatibleModelsError
from hmir.frontends.select import check_frontend, lower_pair
from hmir.ir.modes import eval_mode
from hmir.pipeline.manager import Out, Pass, register_pass


@dataclass(frozen=True)
class LowerOptions:
    """``frontend``: ``"auto"`` (torch.fx, then torch.export when tracing fails), ``"fx"`` or
    ``"export"``."""

    frontend: str = "auto"
    name: str = "lower"

    def __post_init__(self) -> None:
        check_frontend(self.frontend)


def probe(model: nn.Module, x: torch.Tensor, name: str):
    """``model(x)`` in eval mode, ``x`` cast to the model's device and floating dtype."""
    p = next(model.parameters(), None)
    if p is not None:
        x = x.to(device=p.device, dtype=p.dtype if x.is_floating_point() else x.dtype)
    try:
        with eval_mode(model):
            return model(x)
    except Exception as e:
        raise CalibrationError(f"calibration batch 0 of shape {tuple(x.shape)} could not be run by "
                               f"{name} ({type(model).__name__}): {e}") from e


def check_io(a: nn.Module, b: nn.Module, x: torch.Tensor, names) -> None:
    """Both models run on ``x`` and give outputs of one shape (merged models share them)."""
    ya, yb = probe(a, x, names[0]), probe(b, x, names[1])
    sa = tuple(ya.shape) if isinstance(ya, torch.Tensor) else type(ya).__name__
    sb = tuple(yb.shape) if isinstance(yb, torch.Tensor) else type(yb).__name__
    if sa != sb:
        raise IncompatibleModelsError(
            f"{names[0]} and {names[1]} give outputs of different shapes on the same input "
            f"{tuple(x.shape)}: {sa} vs {sb}; merged models must share input and output spaces")


class Lower(Pass):
    """Check both models run on the example and lower them to merge IRs."""

    name = "lower"
    requires = ("models", "names", "example")
    provides = ("irs", "frontends")
    options = LowerOptions

    def run(self, state, options: LowerOptions) -> Out:
        check_io(*state.models, state.example, state.names)
        ir_a, ir_b, used, notes = lower_pair(*state.models, state.example, state.names,
                                             options.frontend)
        state.report.frontends = (used, used)
        return Out({"irs": (ir_a, ir_b), "frontends": (used, used)}, notes)


register_pass(Lower())
