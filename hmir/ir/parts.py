"""Within-group structure of a grouped space: parts, pinned units and views of other spaces.

A grouped space (attention heads) permutes whole groups; inside a group its units were
assumed free. Two things restrict that:

- **Parts.** Rotary position embedding mixes unit ``i`` of a head with ``i + d/2`` (or its
  neighbour) at a frequency that depends on ``i``: those units must stay where they are
  (*pinned*). A slice of a head's units (partial rotary, a fused q|k|v head) cuts the head:
  units never move across a cut. ``Space.parts`` lists a group's parts as
  ``(start, stop, pinned)`` triples covering ``0..group_size``; ``()`` means one free part.
- **Views.** Grouped-query attention serves ``rep`` query heads with one key/value head, and
  a fused projection's output can hold q, k and v side by side inside each head. A space that
  is a :class:`SpaceView` of a *base* space permutes as the base does: its group
  ``g·rep + r`` moves with the base's group ``g`` (the order of the ``rep`` copies inside is
  free, shared by every view of one group class), and its unit ``j`` of that group moves as
  the base's unit ``lo + j``.

Example::

    >>> make_parts(16, cuts={8}, pins=[(0, 8)])          # partial rotary: 8 pinned, 8 free
    ((0, 8, True), (8, 16, False))
    >>> make_parts(16, cuts={8}, pins=[(0, 8), (8, 16)])   # rotate_half: the whole head pinned
    ((0, 16, True),)
    >>> within_perm(((0, 8, True), (8, 16, False)), torch.Generator().manual_seed(0))[:8].tolist()
    [0, 1, 2, 3, 4, 5, 6, 7]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

Parts = tuple  # tuple[tuple[int, int, bool], ...]


@dataclass(frozen=True)
class SpaceView:
    """This space's group ``g·rep + r``, unit ``j`` shows ``base``'s group ``g``, unit ``lo + j``."""

    base: int
    rep: int = 1
    lo: int = 0


def make_parts(k: int, cuts=(), pins=()) -> Parts:
    """Parts of a group of ``k`` units cut at ``cuts``, with the ranges ``pins`` pinned.

    Returns ``()`` when nothing restricts the group (one free part).
    """
    edges = sorted({0, k} | {c for c in cuts if 0 < c < k} |
                   {e for lo, hi in pins for e in (lo, hi) if 0 < e < k})
    if len(edges) == 2 and not pins:
        return ()
    parts: list[tuple[int, int, bool]] = []
    for lo, hi in zip(edges, edges[1:]):
        pinned = any(plo <= lo and hi <= phi for plo, phi in pins)
        if parts and pinned and parts[-1][2]:            # pinned units: one part (none move)
            parts[-1] = (parts[-1][0], hi, True)
        else:
            parts.append((lo, hi, pinned))
    return tuple(parts)


def is_edge(parts: Parts, k: int, pos: int) -> bool:
    """Whether no unit moves across ``pos`` (a part boundary, or inside a pinned part)."""
    return pos in (0, k) or any(lo <= pos <= hi if p else pos in (lo, hi) for lo, hi, p in parts)


def full(parts: Parts, k: int) -> Parts:
    """``parts`` spelled out (``()`` becomes one free part of ``k`` units)."""
    return parts or ((0, k, False),)


def cuts_and_pins(parts: Parts) -> tuple[set[int], list[tuple[int, int]]]:
    """The cuts and pinned ranges that :func:`make_parts` turns back into ``parts``."""
    return {lo for lo, _, _ in parts}, [(lo, hi) for lo, hi, p in parts if p]


def restrict(parts: Parts, k: int, lo: int, hi: int) -> Parts:
    """The parts of units ``lo..hi`` (renumbered from 0); ``lo``, ``hi`` must be cuts."""
    out = [(max(a, lo) - lo, min(b, hi) - lo, p) for a, b, p in full(parts, k) if a < hi and b > lo]
    return make_parts(hi - lo, {a for a, _, _ in out}, [(a, b) for a, b, p in out if p])


def is_pinned(parts: Parts) -> bool:
    """Whether some unit of the group is pinned."""
    return any(p for _, _, p in parts)


def within_perm(parts: Parts, gen: torch.Generator, k: int | None = None) -> torch.Tensor:
    """A random permutation of one group's units that keeps parts and pinned units."""
    k = k if k is not None else parts[-1][1]
    perm = torch.arange(k)
    for lo, hi, pinned in full(parts, k):
        if not pinned:
            perm[lo:hi] = lo + torch.randperm(hi - lo, generator=gen)
    return perm


def pinned_classes(ir) -> set[int]:
    """The group classes of ``ir`` that hold pinned units."""
    return {s.group_class for s in ir.spaces if is_pinned(s.parts)}


def keeps_group_size(ir, space, pinned: set[int] | None = None) -> bool:
    """Whether merging changes ``space``'s group *count* rather than its group size: its group
    class holds pinned units (a rotary head's size is fixed by its frequencies). ``pinned``:
    :func:`pinned_classes` of ``ir``, when the caller has it."""
    pinned = pinned_classes(ir) if pinned is None else pinned
    return space.group_size > 1 and space.group_class in pinned


def resized_group_sizes(ir, width: dict[int, int]) -> dict[int, int]:
    """Every space's group size at the widths ``width`` (space id → width): kept (see
    :func:`keeps_group_size`) or the width over the kept group count."""
    pinned = pinned_classes(ir)
    return {s.id: s.group_size if s.group_size == 1 or s.group_class in pinned
            else width[s.id] // s.groups for s in ir.spaces}
