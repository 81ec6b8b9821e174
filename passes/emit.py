"""emit: the merged ``nn.Module`` (an fx GraphModule) from A's IR, the merged state dict and the
new widths (:func:`hmir.backend.emit`).

Example::

    >>> from hmir.pipeline.manager import get_pass
    >>> get_pass("emit").requires
    ('irs', 'merged', 'widths')
"""
from __future__ import annotations

from hmir.backend import emit
from hmir.pipeline.manager import Out, Pass, register_pass


class Emit(Pass):
    """Build the merged module at the merged widths."""

    name = "emit"
    requires = ("irs", "merged", "widths")
    provides = ("module",)

    def run(self, state, options) -> Out:
        return Out({"module": emit(state.irs[0], state.merged, state.widths or None)})


register_pass(Emit())
