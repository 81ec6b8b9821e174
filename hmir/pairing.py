"""Correspondence of two lowered models of one architecture: space by space, point by point.

Example::

    >>> pairs = pair_spaces(ir_a, ir_b)     # raises IncompatibleModelsError on a mismatch
"""
from __future__ import annotations

from hmir.errors import IncompatibleModelsError
from hmir.ir import MergeIR, Space
from hmir.passes.observe import SpacePair


def _signature(s: Space) -> tuple:
    return (s.n, s.fixed, s.group_size, len(s.slices))


def pair_spaces(ir_a: MergeIR, ir_b: MergeIR) -> list[SpacePair]:
    """Pair the spaces of two models of the same architecture (same structure, same widths)."""
    if len(ir_a.spaces) != len(ir_b.spaces):
        raise IncompatibleModelsError(
            f"{ir_a.name} has {len(ir_a.spaces)} spaces and {ir_b.name} has {len(ir_b.spaces)}: the "
            f"architectures differ; this version merges models of one architecture only")
    pairs = []
    for sa, sb in zip(ir_a.spaces, ir_b.spaces):
        if _signature(sa) != _signature(sb):
            raise IncompatibleModelsError(
                f"space '{sa.name}' of {ir_a.name} (width {sa.n}, fixed={sa.fixed}, "
                f"groups of {sa.group_size}) does not match space '{sb.name}' of {ir_b.name} "
                f"(width {sb.n}, fixed={sb.fixed}, groups of {sb.group_size}); this version "
                f"merges models of one architecture and width only")
        if sa.fixed or not sa.points:
            pairs.append(SpacePair(sa.id, sb.id, ()))
        elif len(sa.points) == len(sb.points):
            pairs.append(SpacePair(sa.id, sb.id, tuple(zip(sa.points, sb.points))))
        else:
            pairs.append(SpacePair(sa.id, sb.id, ((sa.points[-1], sb.points[-1]),)))
    return pairs
