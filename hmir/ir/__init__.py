"""Layer 1, the merge IR: spaces, slices, observation points (:mod:`~hmir.ir.core`) and what is
computed from the IR alone — verification, printing, slicing, pairing two IRs, units and
stages, zero-by-construction values. Imports nothing of hmir but :mod:`hmir.errors`.

Example::

    >>> from hmir.ir import MergeIR, Space
    >>> MergeIR.__module__
    'hmir.ir.core'
"""
from hmir.ir.core import Axis, MergeIR, ObsPoint, Segment, Slice, Space  # noqa: F401
from hmir.ir.parts import SpaceView  # noqa: F401

__all__ = ["Axis", "MergeIR", "ObsPoint", "Segment", "Slice", "Space", "SpaceView"]
