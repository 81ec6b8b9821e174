"""interpolate: MAL's merged weights ``(1−λ)·W_A + λ·P(W_B)`` in A's architecture, for the
tensors under the module prefixes ``layers`` (all when None), from the ``weight_match`` result.

Example::

    >>> from hmir.pipeline.manager import get_pass
    >>> get_pass("interpolate").provides
    ('merged',)
"""
from __future__ import annotations

from hmir.algorithms.interpolate import interpolate
from hmir.ir.pairing import param_map
from hmir.ir.verify import verify
from hmir.passes.weight_match import align_state
from hmir.pipeline.manager import Out, Pass, register_pass


class Interpolate(Pass):
    """Blend A with B aligned onto A (method parameters ``lam`` and ``layers``)."""

    name = "interpolate"
    requires = ("irs", "pairs", "weight_matching", "params")
    provides = ("merged",)

    def run(self, state, options) -> Out:
        ir_a, ir_b = state.irs
        state_a, state_b = ir_a.graph_module.state_dict(), ir_b.graph_module.state_dict()
        names = param_map(ir_a, ir_b, state.pairs)
        aligned = align_state(ir_a, ir_b, state_b, state.weight_matching, names=names,
                              state_a=state_a)
        merged = interpolate(state_a, aligned, state.params["lam"], layers=state.params["layers"])
        verify(ir_a, merged)
        return Out({"merged": merged})


register_pass(Interpolate())
