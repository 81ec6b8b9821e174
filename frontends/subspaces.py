"""Sub-spaces: a space cut into spaces of consecutive units where an op needs a boundary.

A channel slice ``x[:, :n]`` (GhostNet's ``cat([x1, x2])[:, :out]``, DPN's residual and dense
parts of one conv's output), a residual add of a concatenation to a tensor produced whole, or
a chunk of interleaved units may cut a space. Cutting a permutation group into groups of
consecutive units is always exact: every permutation of the pieces is a permutation of the
whole. :func:`refine` does it for the space's whole union class (every member is cut at the
same units and the pieces are joined piecewise): parameter slices, observation points, the
axes every lowered value carries and recorded literal sizes follow. A space already grouped
(heads, grouped convs), viewed, cut within its groups or flattened with ``outer > 1`` is an
error that says so.

Example (a fresh linear's 8 units cut at 3; the add joins the pieces with two parameters)::

    >>> import torch, torch.nn as nn
    >>> from hmir.frontends.export import lower
    >>> class Parts(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc, self.a, self.b = nn.Linear(4, 8), nn.Linear(4, 3), nn.Linear(4, 5)
    ...     def forward(self, x):
    ...         return self.fc(x) + torch.cat([self.a(x), self.b(x)], 1)
    >>> ir = lower(Parts(), torch.randn(2, 4))
    >>> sorted((s.n, sl.offset) for s in ir.spaces for sl in s.slices
    ...         if sl.param == "fc.weight" and sl.dim == 0)
    [(3, 0), (5, 3)]
"""
from __future__ import annotations

from dataclasses import replace

from hmir.frontends.builder import Val
from hmir.ir import Segment


def _values(b):
    """Every lowered value (tuples of pieces included), each once."""
    seen, stack = set(), list(b.values.values())
    while stack:
        v = stack.pop()
        if isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, Val) and id(v) not in seen:
            seen.add(id(v))
            yield v
            stack.extend(getattr(v, "pieces", ()) or ())


def _members(b, sid: int) -> list[int]:
    root = b.uf[sid]
    return [i for i in range(len(b.raw)) if b.uf[i] == root]


def _why_not(b, members: list[int]) -> str | None:
    ms = set(members)
    if any(b.raw[i].group_size != 1 or b.raw[i].cuts or b.raw[i].pins for i in ms):
        return "they are grouped (attention heads, a grouped conv)"
    if any(a in ms or c in ms for a, c in b.group_links) or \
            any(s in ms or v.base in ms for s, v in b.views):
        return "they are linked to a group of heads"
    if any(sl.space in ms and (sl.outer != 1 or sl.grouped) for sl in b.slices):
        return "a layer reads them flattened with another dim (outer > 1)"
    for v in _values(b):
        if any(s.space in ms and s.outer != 1 for a in v.axes.values() for s in a):
            return "a value holds them flattened with another dim (outer > 1)"
        if any(h.space in ms for h in (getattr(v, "heads", None) or {}).values()):
            return "they are split into attention heads"
    if any(m in ms for ids in getattr(b, "split", {}).values() for m in ids) or any(
            k in ("units", "groups") and w in ms for *_, k, w in getattr(b, "sizes", ())):
        return "they are split into heads"
    return None


def refine(b, sid: int, cuts) -> dict[int, list[int]]:
    """Cut space ``sid`` (and every space joined with it) at the unit positions ``cuts``.

    Returns, per member of the union class, the ids of its pieces in order (the first piece
    keeps the member's id). Raises a :class:`~hmir.errors.LoweringError` naming the node
    when the space cannot be cut.
    """
    n = b.width(sid)
    edges = sorted({0, n} | {int(c) for c in cuts if 0 < c < n})
    if len(edges) == 2:
        return {i: [i] for i in _members(b, sid)}
    members = _members(b, sid)
    why = _why_not(b, members)
    if why:
        b.fail(f"cuts space '{b.raw[sid].name}' (width {n}) at units {edges[1:-1]}, which hmir "
               f"cannot do because {why}")
    spans = list(zip(edges, edges[1:]))
    pieces: dict[int, list[int]] = {}
    for i in members:
        rs = b.raw[i]
        pieces[i] = [i] + [b.new_space(hi - lo, f"{rs.name}[{lo}:{hi}]", fixed=rs.fixed)
                           for lo, hi in spans[1:]]
        rs.width = spans[0][1]
    for k in range(1, len(spans)):
        for i in members[1:]:
            b.uf.union(pieces[members[0]][k], pieces[i][k])
    _follow(b, pieces, edges)
    return pieces


def _follow(b, pieces: dict[int, list[int]], edges: list[int]) -> None:
    """Slices, points, joins, values' axes and origins and literal sizes follow the pieces."""
    def cut(sl):
        return [replace(sl, space=p, offset=sl.offset + lo * sl.inner)
                for p, lo in zip(pieces[sl.space], edges)]
    b.slices = [s for sl in b.slices for s in (cut(sl) if sl.space in pieces else [sl])]
    b.points += [(p, replace(pt, offset=pt.offset + lo)) for sid, pt in list(b.points)
                 if sid in pieces for p, lo in zip(pieces[sid][1:], edges[1:])]
    b.joins += [(p, node) for sid, node in list(b.joins) if sid in pieces
                for p in pieces[sid][1:]]
    swap = lambda axis: swap_axis(axis, pieces)
    for v in _values(b):
        if any(s.space in pieces for a in v.axes.values() for s in a):
            v.axes = {d: swap(a) for d, a in v.axes.items()}
        if any(s in pieces for s in v.origin):
            v.origin = {**v.origin, **{p: replace(pt, offset=pt.offset + lo)
                                       for s, pt in v.origin.items() if s in pieces
                                       for p, lo in zip(pieces[s][1:], edges[1:])}}
    sizes = getattr(b, "sizes", [])
    for i, (name, arg, index, kind, what) in enumerate(sizes):
        if kind == "extent":
            sizes[i] = (name, arg, index, kind, swap(what))


def swap_axis(axis: tuple, pieces: dict[int, list[int]]) -> tuple:
    """``axis`` with every segment of a cut space replaced by its pieces' segments."""
    return tuple(replace(s, space=p) for s in axis for p in pieces.get(s.space, [s.space]))


def _cut_once(b, axis: tuple, positions, only_flat: bool = False) -> dict | None:
    """Cut the first segment of ``axis`` that holds one of the entry ``positions`` strictly
    inside; returns :func:`refine`'s pieces, or None when every position is a bound."""
    start = 0
    for seg in axis:
        n = b.axis_width((seg,))
        inside = [p - start for p in positions if start < p < start + n]
        if inside and not (only_flat and seg.inner == 1):
            if seg.outer != 1 or any(p % seg.inner for p in inside):
                b.fail(f"cuts feature segment {seg} at entries {inside}, inside the entries of "
                       f"one unit or of a flattened dim; only whole units can be cut")
            return refine(b, seg.space, [p // seg.inner for p in inside])
        start += n
    return None


def cut_at(b, axis: tuple, positions, only_flat: bool = False) -> tuple:
    """``axis`` with a segment bound at every entry position of ``positions`` (cutting spaces
    with :func:`refine`); ``only_flat``: cut only segments whose units span several entries
    (``inner > 1``). A position inside one unit's entries is an error."""
    while (pieces := _cut_once(b, axis, positions, only_flat)) is not None:
        axis = swap_axis(axis, pieces)
    return axis


def align_axes(b, x: tuple, y: tuple) -> tuple[tuple, tuple]:
    """Two axes laid over the same entries, cut until their segments have the same bounds
    (a residual add of ``cat([a, b])`` to a tensor produced whole: the whole is cut)."""
    if b.axis_width(x) != b.axis_width(y):
        b.fail(f"joins two feature axes of different extents: {x} vs {y}")
    while True:
        bx, by = _bounds(b, x), _bounds(b, y)
        pieces = _cut_once(b, x, by - bx) or _cut_once(b, y, bx - by)
        if pieces is None:
            return x, y
        x, y = swap_axis(x, pieces), swap_axis(y, pieces)


def _bounds(b, axis: tuple) -> set[int]:
    out, pos = set(), 0
    for seg in axis:
        pos += b.axis_width((seg,))
        out.add(pos)
    return out
