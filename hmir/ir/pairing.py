"""Correspondence of two lowered models of one structure: space by space, parameter by parameter.

Two models correspond when their graphs have the same structure (same ops in the same
order; widths may differ). Spaces are paired in creation order and every parameter of A
is paired with the parameter of B that holds the same slices, so parameter *names* may
differ (e.g. a model inflated with inserted units).

Example::

    >>> from hmir.frontends import lower
    >>> from hmir.harness import zoo
    >>> ir_a = lower(zoo.mlp(4, (8,), 2), torch.randn(2, 4))
    >>> ir_b = lower(zoo.mlp(4, (16,), 2), torch.randn(2, 4))      # another width: still pairs
    >>> pairs = pair_spaces(ir_a, ir_b)     # raises IncompatibleModelsError on a mismatch
    >>> [(p.a, p.b, len(p.points)) for p in pairs]
    [(0, 0, 0), (1, 1, 1), (2, 2, 0)]
    >>> param_map(ir_a, ir_b, pairs)["3.weight"]
    '3.weight'
"""
from __future__ import annotations

from dataclasses import dataclass

from hmir.errors import IncompatibleModelsError
from hmir.ir.core import MergeIR, ObsPoint, Space


@dataclass(frozen=True)
class SpacePair:
    """Corresponding spaces of A and B with their paired observation points."""

    a: int
    b: int
    points: tuple[tuple[ObsPoint, ObsPoint], ...]


def _signature(s: Space) -> tuple:
    return (s.fixed, s.group_size > 1, len(s.slices), tuple((sl.dim, sl.role) for sl in s.slices))


def _describe(ir: MergeIR, s: Space) -> str:
    return (f"space '{s.name}' of {ir.name} (width {s.n}, fixed={s.fixed}, groups of {s.group_size}, "
            f"{len(s.slices)} parameter slices)")


def mismatch(ir_a: MergeIR, ir_b: MergeIR) -> str | None:
    """Why the spaces of two IRs do not pair one to one, or None when they do."""
    if len(ir_a.spaces) != len(ir_b.spaces):
        return (f"{ir_a.name} has {len(ir_a.spaces)} spaces and {ir_b.name} has {len(ir_b.spaces)}: "
                f"their structures differ (different ops, not only different depth or width); "
                f"print(hmir.frontends.lower(model, x)) shows each model's spaces")
    for sa, sb in zip(ir_a.spaces, ir_b.spaces):
        if _signature(sa) != _signature(sb) or (sa.fixed and sa.n != sb.n):
            return (f"{_describe(ir_a, sa)} does not correspond to {_describe(ir_b, sb)}: the "
                    f"models' structures differ there")
    return None


def pair_spaces(ir_a: MergeIR, ir_b: MergeIR) -> list[SpacePair]:
    """Pair the spaces of two models of the same structure (widths may differ, fixed may not)."""
    why = mismatch(ir_a, ir_b)
    if why is not None:
        raise IncompatibleModelsError(why)
    pairs = []
    for sa, sb in zip(ir_a.spaces, ir_b.spaces):
        if sa.fixed or not sa.points:
            pairs.append(SpacePair(sa.id, sb.id, ()))
        elif len(sa.points) == len(sb.points):
            pairs.append(SpacePair(sa.id, sb.id, tuple(zip(sa.points, sb.points))))
        else:
            pairs.append(SpacePair(sa.id, sb.id, ((sa.points[-1], sb.points[-1]),)))
    return pairs


def param_map(ir_a: MergeIR, ir_b: MergeIR, pairs: list[SpacePair]) -> dict[str, str]:
    """A's sliced parameter names → B's, from the slices of paired spaces (checked one-to-one)."""
    out: dict[str, str] = {}
    for p in pairs:
        for sa, sb in zip(ir_a.space(p.a).slices, ir_b.space(p.b).slices):
            if out.setdefault(sa.param, sb.param) != sb.param:
                raise IncompatibleModelsError(
                    f"{ir_a.name}'s parameter '{sa.param}' corresponds to both '{out[sa.param]}' "
                    f"and '{sb.param}' of {ir_b.name}: the models' structures differ")
    if len(set(out.values())) != len(out):
        raise IncompatibleModelsError(f"two parameters of {ir_a.name} correspond to one of {ir_b.name}")
    return out


def absent_pair(p: SpacePair, absent: tuple[frozenset, frozenset]) -> str | None:
    """``"a"``/``"b"`` when that side of the pair is absent (an inserted zero block's inner
    features, listed per model in ``absent``), else None.

    Example::

        >>> absent_pair(SpacePair(3, 5, ()), (frozenset(), frozenset({5})))
        'b'
    """
    if p.a in absent[0]:
        return "a"
    return "b" if p.b in absent[1] else None
