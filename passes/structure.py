"""structure: decide, by an explicit check, how two lowered models correspond.

``"same"``: their spaces pair one to one (widths may differ). ``"depth"``: they do not, but
their stages correspond and differ in depth, so ``align_depth`` inflates the shallower one.
Anything else is an :class:`~hmir.errors.IncompatibleModelsError` that says where the
structures differ — raised here, right after lowering, before any calibration forward.

Example::

    >>> import torch
    >>> from hmir.harness import zoo
    >>> from hmir.frontends import lower
    >>> x = torch.randn(2, 3, 32, 32)
    >>> structure_of(lower(zoo.resnet20(), x, "a"), lower(zoo.resnet26(), x, "b"))[0]
    'depth'
    >>> structure_of(lower(zoo.resnet20(), x, "a"), lower(zoo.resnet20(width=2), x, "b"))[0]
    'same'
"""
from __future__ import annotations

from hmir.errors import IncompatibleModelsError
from hmir.ir import MergeIR
from hmir.ir.pairing import mismatch
from hmir.passes.depth import check_stages
from hmir.pipeline.manager import Out, Pass, register_pass


def structure_of(ir_a: MergeIR, ir_b: MergeIR) -> tuple[str, tuple | None]:
    """``("same", None)`` or ``("depth", (stages of A, stages of B))``; raises when neither."""
    why = mismatch(ir_a, ir_b)
    if why is None:
        return "same", None
    stages = check_stages(ir_a, ir_b)          # raises, naming the stages that differ
    if all(len(sa.pieces) == len(sb.pieces) for sa, sb in zip(*stages)):
        raise IncompatibleModelsError(why)     # same depth: the structures really differ
    return "depth", stages


class Structure(Pass):
    """Same structure or depth-heterogeneous (see the module docstring)."""

    name = "structure"
    requires = ("irs",)
    provides = ("structure", "stages")

    def run(self, state, options) -> Out:
        kind, stages = structure_of(*state.irs)
        return Out({"structure": kind, "stages": stages})


register_pass(Structure())
