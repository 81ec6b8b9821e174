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
        layers = _with_ties(ir_a.ties, state_a, state.params["layers"])
        merged = interpolate(state_a, aligned, state.params["lam"], layers=layers)
        verify(ir_a, merged)
        return Out({"merged": merged})


def _with_ties(ties: dict[str, str], keys, layers):
    """``layers`` plus every other name of a tied tensor one of whose names it selects (a
    tied tensor is merged under all its names or under none)."""
    if layers is None or not ties:
        return layers
    prefixes = [layers] if isinstance(layers, str) else list(layers)
    hit = {k for k in keys if any(k == p or k.startswith(p + ".") for p in prefixes)}
    extra = {n for alias, canon in ties.items() if {alias, canon} & hit for n in (alias, canon)}
    return prefixes + sorted(extra - hit)


register_pass(Interpolate())
