"""pair: the corresponding spaces of the two (inflated) IRs, with their observation points
(:func:`hmir.ir.pairing.pair_spaces`).

Example::

    >>> from hmir.pipeline.manager import get_pass
    >>> get_pass("pair").requires, get_pass("pair").provides
    (('irs',), ('pairs',))
"""
from __future__ import annotations

from hmir.ir.pairing import pair_spaces
from hmir.pipeline.manager import Out, Pass, register_pass


class Pair(Pass):
    """Pair the spaces of two IRs of one structure."""

    name = "pair"
    requires = ("irs",)
    provides = ("pairs",)

    def run(self, state, options) -> Out:
        return Out({"pairs": pair_spaces(*state.irs)})


register_pass(Pair())
